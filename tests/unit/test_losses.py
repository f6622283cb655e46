"""MPO and GSPO losses on literal log-probabilities, each term against its formula written out here, and
against TRL's own loss code (DPOTrainer._compute_loss, GRPOTrainer._compute_loss) called with a stand-in
trainer holding only the attributes those methods read."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from keyeflow.training.losses import (
    GSPOConfig,
    MPOConfig,
    RewardShift,
    group_advantages,
    gspo_loss,
    mpo_loss,
    token_logprobs,
)

F64 = torch.float64


def t(values, dtype=F64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- MPO

# Three pairs. Log-ratios (policy − reference): chosen [1, −0.5, −0.25], rejected [−1, 1, 1];
# with β = 0.1 the rewards are chosen [0.1, −0.05, −0.025], rejected [−0.1, 0.1, 0.1],
# margins [0.2, −0.15, −0.125] (one pair of three ranked right).
POLICY_CHOSEN = [-12.0, -30.5, -7.25]
POLICY_REJECTED = [-15.0, -28.0, -9.0]
REF_CHOSEN = [-13.0, -30.0, -7.0]
REF_REJECTED = [-14.0, -29.0, -10.0]
CHOSEN_TOKENS = [4, 10, 3]
CHOSEN_REWARDS = [0.1, -0.05, -0.025]
REJECTED_REWARDS = [-0.1, 0.1, 0.1]
MARGINS = [0.2, -0.15, -0.125]


def mpo_inputs(grad: bool = False):
    return (
        t(POLICY_CHOSEN, grad=grad),
        t(POLICY_REJECTED, grad=grad),
        t(REF_CHOSEN),
        t(REF_REJECTED),
        torch.tensor(CHOSEN_TOKENS),
    )


def expected_dpo() -> float:
    return sum(-logsig(m) for m in MARGINS) / 3


def expected_bco(delta: float) -> float:
    return (
        sum(-logsig(c - delta) - logsig(-(r - delta)) for c, r in zip(CHOSEN_REWARDS, REJECTED_REWARDS)) / 3
    )


EXPECTED_SFT = (12.0 + 30.5 + 7.25) / (4 + 10 + 3)  # Σ chosen NLL / Σ chosen tokens


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta"), ({"beta": -1}, "beta"), ({"beta": float("nan")}, "beta"),
    ({"dpo_weight": -0.1}, "dpo_weight"), ({"sft_weight": float("inf")}, "sft_weight"),
    ({"bco_weight": True}, "bco_weight"), ({"dpo_weight": 0, "bco_weight": 0, "sft_weight": 0}, "all 0"),
])  # fmt: skip
def test_mpo_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MPOConfig(**kwargs)


def test_mpo_config_defaults_are_internvl_weights():
    config = MPOConfig()
    assert (config.beta, config.dpo_weight, config.bco_weight, config.sft_weight) == (0.1, 0.8, 0.2, 1.0)


def test_mpo_terms_match_their_formulas_without_shift():
    out = mpo_loss(MPOConfig(), *mpo_inputs(), reward_shift=None)
    assert out.chosen_rewards.tolist() == pytest.approx(CHOSEN_REWARDS)
    assert out.rejected_rewards.tolist() == pytest.approx(REJECTED_REWARDS)
    assert out.dpo.item() == pytest.approx(expected_dpo(), rel=1e-12)
    assert out.bco.item() == pytest.approx(expected_bco(0.0), rel=1e-12)
    assert out.sft.item() == pytest.approx(EXPECTED_SFT, rel=1e-12)
    assert out.loss.item() == pytest.approx(
        0.8 * expected_dpo() + 0.2 * expected_bco(0.0) + EXPECTED_SFT, rel=1e-12
    )
    assert out.reward_margin.item() == pytest.approx(sum(MARGINS) / 3)
    assert out.reward_accuracy.item() == pytest.approx(1 / 3)
    assert out.bco_shift == 0.0


def test_bco_shift_is_the_running_mean_of_batch_means_including_the_current_batch():
    shift = RewardShift()
    first = mpo_loss(MPOConfig(), *mpo_inputs(), reward_shift=shift)
    m1 = (0.1 - 0.05 - 0.025 - 0.1 + 0.1 + 0.1) / 6
    assert first.bco_shift == pytest.approx(m1)
    assert first.bco.item() == pytest.approx(expected_bco(m1), rel=1e-12)
    # A second batch whose rewards are all 0.3 (log-ratios 3): δ = (m1 + 0.3) / 2, each batch counted once.
    second = mpo_loss(
        MPOConfig(),
        t([-1.0, -2.0]),
        t([-4.0, -5.0]),
        t([-4.0, -5.0]),
        t([-7.0, -8.0]),
        torch.tensor([1, 1]),
        reward_shift=shift,
    )
    delta = (m1 + 0.3) / 2
    assert shift.num_batches == 2 and shift.mean == pytest.approx(delta)
    assert second.bco_shift == pytest.approx(delta)
    assert second.bco.item() == pytest.approx(-logsig(0.3 - delta) - logsig(-(0.3 - delta)), rel=1e-12)


def test_reward_shift_matches_trl_running_moments_fed_one_scalar_per_batch():
    # TRL's bco_pair (0.x, the version InternVL's MPO used): RunningMoments(mean=0, var=1, count=1e-24),
    # updated with the batch's mean reward as a one-element tensor, then δ = running.mean.
    mean, var, count = 0.0, 1.0, 1e-24
    ours = RewardShift()
    for batch_mean in (0.02, -0.4, 0.13, 0.5):
        delta = batch_mean - mean
        total = count + 1
        var = (var * count + delta**2 * count * 1 / total) / total
        mean += delta * 1 / total
        count = total
        assert ours.update(batch_mean) == pytest.approx(mean, rel=1e-12, abs=1e-15)


def test_zero_bco_weight_reduces_to_dpo_plus_sft_and_weights_scale_terms():
    out = mpo_loss(MPOConfig(bco_weight=0.0), *mpo_inputs(), reward_shift=None)
    assert out.loss.item() == pytest.approx(0.8 * expected_dpo() + EXPECTED_SFT, rel=1e-12)
    only_dpo = mpo_loss(
        MPOConfig(dpo_weight=1.0, bco_weight=0.0, sft_weight=0.0), *mpo_inputs(), reward_shift=None
    )
    assert only_dpo.loss.item() == pytest.approx(expected_dpo(), rel=1e-12)
    doubled = mpo_loss(
        MPOConfig(dpo_weight=1.6, bco_weight=0.4, sft_weight=2.0), *mpo_inputs(), reward_shift=None
    )
    default = mpo_loss(MPOConfig(), *mpo_inputs(), reward_shift=None)
    assert doubled.loss.item() == pytest.approx(2 * default.loss.item(), rel=1e-12)


def test_mpo_gradients_are_the_analytical_ones():
    beta, shift = 0.1, RewardShift()
    pc, pr, rc, rr, n = mpo_inputs(grad=True)
    out = mpo_loss(MPOConfig(), pc, pr, rc, rr, n, reward_shift=shift)
    out.loss.backward()
    delta, num_pairs, num_tokens = shift.mean, 3, sum(CHOSEN_TOKENS)
    for i in range(3):
        m, c, r = MARGINS[i], CHOSEN_REWARDS[i], REJECTED_REWARDS[i]
        # d/dx −logσ(βx − βy) = −β σ(−(βx − βy)); d/dx −logσ(βx − δ) = −β σ(−(βx − δ));
        # d/dx −logσ(−(βy − δ)) = β σ(βy − δ)
        d_chosen = (0.8 * -beta * sig(-m) + 0.2 * -beta * sig(-(c - delta))) / num_pairs - 1.0 / num_tokens
        d_rejected = (0.8 * beta * sig(-m) + 0.2 * beta * sig(r - delta)) / num_pairs
        assert pc.grad[i].item() == pytest.approx(d_chosen, rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(d_rejected, rel=1e-10)


def test_mpo_rejects_bad_inputs():
    pc, pr, rc, rr, n = mpo_inputs()
    with pytest.raises(ValueError, match="one shape"):
        mpo_loss(MPOConfig(), pc, pr[:2], rc, rr, n, reward_shift=None)
    with pytest.raises(ValueError, match="at least one token"):
        mpo_loss(MPOConfig(), pc, pr, rc, rr, torch.tensor([4, 0, 3]), reward_shift=None)
    with pytest.raises(ValueError, match="not finite"):
        RewardShift().update(float("nan"))


# ---------------------------------------------------------------------------------------------- TRL: DPO side


class OneProcessAccelerator:
    """What TRL's loss methods call on `self.accelerator`, for one process: gathers and reductions are
    identity."""

    device = torch.device("cpu")
    is_main_process = True
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()


def trl_dpo_loss(loss_types: list[str], loss_weights: list[float], beta: float = 0.1):
    """TRL's DPOTrainer._compute_loss on the pairs above. The model stands in for TRL's fused LM head: it
    returns per-token log-probs (zero outside the completion) that sum to the literal sequence log-probs;
    reference log-probs are passed as precomputed, as with `precompute_ref_log_probs=True`."""
    from trl.trainer.dpo_trainer import DPOTrainer

    rejected_tokens = [5, 8, 2]
    counts = CHOSEN_TOKENS + rejected_tokens
    sums = POLICY_CHOSEN + POLICY_REJECTED
    width = max(counts)
    completion_mask = torch.zeros(6, width + 1, dtype=torch.long)  # column 0: the prompt token
    per_token = torch.zeros(6, width, dtype=F64)
    for row, (count, total) in enumerate(zip(counts, sums)):
        completion_mask[row, 1 : count + 1] = 1
        per_token[row, :count] = total / count  # any split does: only the sums and the counts enter MPO
    per_token.requires_grad_(True)

    def model(**kwargs):
        zeros = torch.zeros(6, width, dtype=F64)
        return SimpleNamespace(
            log_probs=per_token,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(6, width, dtype=torch.bool),
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=OneProcessAccelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=loss_weights, beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(6, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(6, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": t(REF_CHOSEN),
        "ref_rejected_logps": t(REF_REJECTED),
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"], per_token


@pytest.mark.parametrize("loss_type, term", [("sigmoid", "dpo"), ("bco_pair", "bco"), ("sft", "sft")])
def test_each_mpo_term_equals_trl_dpo_trainer_loss_type(loss_type, term):
    trl_loss, _, _ = trl_dpo_loss([loss_type], [1.0])
    ours = mpo_loss(MPOConfig(), *mpo_inputs(), reward_shift=None)  # TRL 1.x bco_pair has no shift: δ = 0
    assert getattr(ours, term).item() == pytest.approx(trl_loss.item(), rel=1e-12)


def test_mpo_total_metrics_and_gradients_equal_trl_mpo_recipe():
    # TRL documents MPO as loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0].
    trl_loss, metrics, per_token = trl_dpo_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    trl_loss.backward()
    pc, pr, rc, rr, n = mpo_inputs(grad=True)
    ours = mpo_loss(MPOConfig(), pc, pr, rc, rr, n, reward_shift=None)
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    assert ours.reward_margin.item() == pytest.approx(metrics["rewards/margins"][0], rel=1e-12)
    assert ours.reward_accuracy.item() == pytest.approx(metrics["rewards/accuracies"][0])
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-12)
    # A response's log-prob is the sum of its tokens', and TRL's SFT term is −1/Σn per chosen token, so every
    # token of a response gets TRL gradient equal to ours w.r.t. the summed log-prob (padding gets none).
    mask = per_token.detach() != 0
    for row in range(3):
        assert per_token.grad[row][mask[row]].tolist() == pytest.approx(
            [pc.grad[row].item()] * CHOSEN_TOKENS[row], rel=1e-10
        )
        assert per_token.grad[3 + row][mask[3 + row]].tolist() == pytest.approx(
            [pr.grad[row].item()] * int(mask[3 + row].sum()), rel=1e-10
        )


# ----------------------------------------------------------------------------------- GSPO: config, advantages


@pytest.mark.parametrize("kwargs, message", [
    ({"epsilon_low": 0.0}, "epsilon_low"), ({"epsilon_low": 1.0}, "epsilon_low"),
    ({"epsilon_high": -1e-4}, "epsilon_high"), ({"kl_coef": -0.1}, "kl_coef"),
    ({"advantage_eps": float("nan")}, "advantage_eps"), ({"epsilon_high": "4e-4"}, "epsilon_high"),
])  # fmt: skip
def test_gspo_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GSPOConfig(**kwargs)


def test_gspo_config_defaults_are_the_papers():
    config = GSPOConfig()
    assert (config.epsilon_low, config.epsilon_high, config.kl_coef) == (3e-4, 4e-4, 0.0)


def test_group_advantages_use_bessel_std_per_prompt_and_zero_for_equal_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.7, 0.7, 0.7, 0.7], [2.0, 0.0, 1.0, 1.0]])
    adv = group_advantages(rewards, eps=1e-4)
    # row 0: mean 0.5, unbiased std sqrt(4·0.25/3) = sqrt(1/3)
    s0 = math.sqrt(1 / 3)
    assert adv[0].tolist() == pytest.approx(
        [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4)] * 1 + [-0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)], rel=1e-6
    )
    # row 1: all equal (0.7 is not exact in binary): exactly 0, no NaN
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    # row 2: mean 1, unbiased std sqrt(2/3)
    s2 = math.sqrt(2 / 3)
    assert adv[2].tolist() == pytest.approx([1 / (s2 + 1e-4), -1 / (s2 + 1e-4), 0.0, 0.0], rel=1e-6, abs=1e-7)


def test_group_advantages_equal_trl_formula():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([[0.3, 1.0, 0.0, 0.25, 0.9], [5.0, -1.0, 2.0, 2.0, 0.5]])
    expected = (rewards - rewards.mean(dim=1, keepdim=True)) / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(group_advantages(rewards, eps=1e-4), expected, rtol=1e-6, atol=1e-7)


def test_group_advantages_reject_bad_shapes():
    with pytest.raises(ValueError, match=">= 2 rollouts"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="num_prompts, group_size"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------------------------------------- GSPO: loss

EPS_LOW, EPS_HIGH = 3e-4, 4e-4


def sequence_form(logps, old, mask, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH):
    """The paper's sequence-level objective written directly: −mean_i min(s_i A_i, clip(s_i) A_i)."""
    m = mask.to(logps.dtype)
    s = torch.exp(((logps - old) * m).sum(1) / m.sum(1))
    return -torch.minimum(s * adv, torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv).mean()


def clipping_case():
    """Five responses (2, 3, 1, 2, 3 tokens, padded to 3) whose log-ratio per token is ±1e-3 or 1e-4, so that
    s = e^(±1e-3) lies outside [1 − 3e-4, 1 + 4e-4] and e^(1e-4) inside, against advantages of both signs."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    old = t([[-1.0, -2.0, 0.0], [-0.5, -0.7, -3.0], [-2.5, 0.0, 0.0], [-1.5, -0.2, 0.0], [-0.9, -1.1, -1.3]])
    # per-response log s: +1e-3, +1e-3, −1e-3, −1e-3, +1e-4 (spread unevenly over the tokens)
    shift = t(
        [[0.5e-3, 1.5e-3, 0.0], [3e-3, 0.0, 0.0], [-1e-3, 0.0, 0.0], [-2e-3, 0.0, 0.0], [0.0, 3e-4, 0.0]]
    )
    logps = (old + shift).requires_grad_(True)
    adv = t([1.0, -1.0, -1.0, 1.0, 0.5])
    log_s = [1e-3, 1e-3, -1e-3, -1e-3, 1e-4]
    clipped = [True, False, True, False, False]  # high & A>0; high & A<0; low & A<0; low & A>0; inside
    return logps, old, mask, adv, log_s, clipped


def test_gspo_clips_both_sides_for_both_advantage_signs():
    logps, old, mask, adv, log_s, clipped = clipping_case()
    out = gspo_loss(GSPOConfig(), logps, adv, mask, old_logps=old)
    s = [math.exp(x) for x in log_s]
    objective = [(1 + EPS_HIGH) * 1.0, s[1] * -1.0, (1 - EPS_LOW) * -1.0, s[3] * 1.0, s[4] * 0.5]
    assert out.loss.item() == pytest.approx(-sum(objective) / 5, rel=1e-12)
    assert out.ratio.tolist() == pytest.approx(s, rel=1e-12)
    assert out.mean_ratio.item() == pytest.approx(sum(s) / 5, rel=1e-12)
    assert out.clip_high_fraction.item() == pytest.approx(1 / 5)
    assert out.clip_low_fraction.item() == pytest.approx(1 / 5)
    assert out.clip_fraction.item() == pytest.approx(2 / 5)
    assert out.kl is None

    out.loss.backward()
    lengths = mask.sum(1).tolist()
    for i in range(5):
        expected = 0.0 if clipped[i] else -adv[i].item() * s[i] / lengths[i] / 5
        for k in range(3):
            assert logps.grad[i, k].item() == pytest.approx(
                expected if mask[i, k] else 0.0, rel=1e-10, abs=1e-15
            )


def test_gspo_token_gradient_equals_the_sequence_form_gradient():
    logps, old, mask, adv, _, _ = clipping_case()
    gspo_loss(GSPOConfig(), logps, adv, mask, old_logps=old).loss.backward()
    ours = logps.grad.clone()
    logps.grad = None
    reference = sequence_form(logps, old, mask, adv)
    reference.backward()
    assert torch.allclose(ours, logps.grad, rtol=1e-12, atol=1e-15)
    assert gspo_loss(GSPOConfig(), logps, adv, mask, old_logps=old).loss.item() == pytest.approx(
        reference.item(), rel=1e-12
    )


def test_on_policy_ratio_is_exactly_one_and_gradient_is_the_advantage_over_length():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    logps = t(
        [[-0.3, -1.2, -2.0, 0.0], [-4.0, 0.0, 0.0, 0.0], [-0.1, -0.2, -0.3, -0.4], [-2.2, -0.01, 0.0, 0.0]],
        grad=True,
    )
    adv = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).flatten().double()  # ±1/(√½ + 1e-4)
    out = gspo_loss(GSPOConfig(), logps, adv, mask)  # old_logps=None: on-policy
    assert out.ratio.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert out.clip_fraction.item() == 0.0
    assert out.loss.item() == pytest.approx(
        -adv.mean().item(), abs=1e-12
    )  # = 0 for group-normalised advantages
    out.loss.backward()
    lengths = [3, 1, 4, 2]
    for i in range(4):
        for k in range(4):
            expected = -adv[i].item() / lengths[i] / 4 if mask[i, k] else 0.0
            assert logps.grad[i, k].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_all_rewards_equal_gives_zero_loss_zero_gradient_no_nan():
    rewards = torch.tensor([[0.3, 0.3, 0.3], [1.0, 1.0, 1.0]])
    adv = group_advantages(rewards).flatten().double()
    mask = torch.ones(6, 2, dtype=torch.bool)
    old = t([[-1.0, -2.0]] * 6)
    logps = (old + 0.01).requires_grad_(True)  # far outside the clipping range
    out = gspo_loss(GSPOConfig(), logps, adv, mask, old_logps=old)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))
    assert out.clip_fraction.item() == 0.0


def test_one_token_responses():
    logps = t([[-0.5], [-1.0], [-2.0]], grad=True)
    old = t([[-0.5001], [-0.9], [-2.0001]])
    adv = t([1.0, -0.5, -2.0])
    out = gspo_loss(GSPOConfig(), logps, adv, torch.ones(3, 1, dtype=torch.bool), old_logps=old)
    s = [math.exp(1e-4), math.exp(-0.1), math.exp(1e-4)]
    # responses 0 and 2: s inside the range; 1: s < 1 − ε_low with A < 0, clipped (no gradient)
    objective = [s[0] * 1.0, (1 - EPS_LOW) * -0.5, s[2] * -2.0]
    assert out.loss.item() == pytest.approx(-sum(objective) / 3, rel=1e-9)
    out.loss.backward()
    assert logps.grad[:, 0].tolist() == pytest.approx([-1.0 * s[0] / 3, 0.0, 2.0 * s[2] / 3], rel=1e-9)


def test_padding_values_are_ignored_even_nan():
    logps, old, mask, adv, _, _ = clipping_case()
    clean = gspo_loss(GSPOConfig(kl_coef=0.1), logps, adv, mask, old_logps=old, ref_logps=old - 0.2)
    clean.loss.backward()
    clean_grad = logps.grad.clone()

    dirty_logps = torch.where(mask, logps.detach(), torch.tensor(float("nan"), dtype=F64)).requires_grad_(
        True
    )
    dirty_old = torch.where(mask, old, torch.tensor(float("-inf"), dtype=F64))
    dirty_ref = torch.where(mask, old - 0.2, torch.tensor(float("nan"), dtype=F64))
    dirty = gspo_loss(
        GSPOConfig(kl_coef=0.1), dirty_logps, adv, mask, old_logps=dirty_old, ref_logps=dirty_ref
    )
    dirty.loss.backward()
    assert dirty.loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)
    assert torch.equal(dirty_logps.grad, clean_grad)
    assert not torch.isnan(dirty_logps.grad).any()


def test_kl_term_is_the_k3_estimator_averaged_per_response():
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    logps = t([[-1.0, -2.0], [-0.5, 0.0]], grad=True)
    ref = t([[-1.5, -1.0], [-0.25, 0.0]])
    adv = t([1.0, -1.0])

    def k3(d):  # d = ref − logp
        return math.exp(d) - d - 1

    kl = ((k3(-0.5) + k3(1.0)) / 2 + k3(0.25)) / 2
    out = gspo_loss(GSPOConfig(kl_coef=0.04), logps, adv, mask, ref_logps=ref)
    assert out.kl.item() == pytest.approx(kl, rel=1e-12)
    assert out.policy_loss.item() == pytest.approx(0.0, abs=1e-15)  # on-policy, advantages sum to 0
    assert out.loss.item() == pytest.approx(0.04 * kl, rel=1e-12)
    out.loss.backward()
    # d/dlogp [e^(ref−logp) − (ref−logp) − 1] = 1 − e^(ref−logp); plus the policy part −A/(N·|y|)
    assert logps.grad[0, 0].item() == pytest.approx(
        0.04 * (1 - math.exp(-0.5)) / 2 / 2 - 1.0 / 2 / 2, rel=1e-12
    )
    assert logps.grad[1, 0].item() == pytest.approx(
        0.04 * (1 - math.exp(0.25)) / 1 / 2 + 1.0 / 1 / 2, rel=1e-12
    )
    assert logps.grad[1, 1].item() == 0.0


def test_bf16_log_probs_are_computed_in_float32():
    # bf16 cannot tell 1 + 4e-4 from 1: the ratios must be formed after casting up, or nothing would ever
    # clip.
    logps, old, mask, adv, _, _ = clipping_case()
    half = logps.detach().to(torch.bfloat16).requires_grad_(True)
    half_old = old.to(torch.bfloat16)
    out = gspo_loss(GSPOConfig(), half, adv.to(torch.bfloat16), mask, old_logps=half_old)
    assert out.loss.dtype == torch.float32
    expected = sequence_form(half.detach().double(), half_old.double(), mask, adv.to(torch.bfloat16).double())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()
    mpo = mpo_loss(
        MPOConfig(),
        *(x.to(torch.bfloat16) for x in mpo_inputs()[:4]),
        torch.tensor(CHOSEN_TOKENS),
        reward_shift=None,
    )
    assert mpo.loss.dtype == torch.float32


def test_gspo_rejects_bad_inputs():
    logps, old, mask, adv, _, _ = clipping_case()
    with pytest.raises(ValueError, match="needs ref_logps"):
        gspo_loss(GSPOConfig(kl_coef=0.1), logps, adv, mask)
    with pytest.raises(ValueError, match="no tokens"):
        gspo_loss(GSPOConfig(), logps, adv, mask & torch.tensor([[1], [0], [1], [1], [1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="one per response"):
        gspo_loss(GSPOConfig(), logps, adv[:3], mask)
    with pytest.raises(ValueError, match="old_logps shape"):
        gspo_loss(GSPOConfig(), logps, adv, mask, old_logps=old[:, :2])


# --------------------------------------------------------------------------------------------- TRL: GSPO side


def trl_gspo_loss(logps, old, ref, mask, adv, beta=0.0):
    """TRL's GRPOTrainer._compute_loss with importance_sampling_level="sequence", loss_type="grpo" (TRL's GSPO
    setting), the model forward replaced by the given per-token log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    n, width = logps.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
        accelerator=OneProcessAccelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="sequence",
        beta=beta, loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), use_vllm=False,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_gspo_equals_trl_grpo_with_sequence_importance_sampling(kl_coef):
    logps, old, mask, adv, _, _ = clipping_case()
    ref = old - torch.tensor([0.3, -0.1, 0.2], dtype=F64)
    trl_logps = logps.detach().clone().requires_grad_(True)
    trl_loss, metrics = trl_gspo_loss(trl_logps, old, ref if kl_coef else None, mask, adv, beta=kl_coef)
    trl_loss.backward()
    ours = gspo_loss(
        GSPOConfig(kl_coef=kl_coef), logps, adv, mask, old_logps=old, ref_logps=ref if kl_coef else None
    )
    ours.loss.backward()
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    assert torch.allclose(logps.grad, trl_logps.grad, rtol=1e-12, atol=1e-15)
    assert ours.clip_low_fraction.item() == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert ours.clip_high_fraction.item() == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert ours.clip_fraction.item() == pytest.approx(metrics["clip_ratio/region_mean"][0])
    # (TRL's logged "kl" metric pools tokens over the batch; the KL inside its loss, which matched above, is
    # averaged per response first, as ours is.)


# -------------------------------------------------------------------------------------------- token log-probs


def test_token_logprobs_equal_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    ids = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)
