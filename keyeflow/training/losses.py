"""The losses of post-training (SPEC §4): MPO for preference pairs, GSPO for group rollouts. Pure torch.

Everything here works on log-probabilities the caller has already computed, so the same functions serve the
single-process loop, DeepSpeed and the tests, and each term can be checked against its formula on literal
numbers. The training loops get them from the model without logits (`forward(logprob_labels=...)`: lm_head and
log-softmax over chunks of positions, `keyeflow.model.chunked_head`); `token_logprobs` is the same computation
on logits already in hand.

**MPO** (mixed preference optimisation, InternVL's setting; Keye names the method but gives no weights):

    L = w_dpo · DPO_sigmoid + w_bco · BCO_pair + w_sft · SFT,   defaults 0.8 / 0.2 / 1.0, β = 0.1

with, per pair, r_c = β (log π(y_c) − log π_ref(y_c)) and r_r = β (log π(y_r) − log π_ref(y_r)) (summed
log-probabilities of the whole response):
- DPO_sigmoid = −log σ(r_c − r_r), mean over pairs;
- BCO_pair = −log σ(r_c − δ) − log σ(−(r_r − δ)), mean over pairs. δ is the reward shift of Binary Classifier
  Optimisation: TRL's `bco_pair` in its 0.x releases (the ones the published MPO recipe was written against)
  keeps it as the running mean of the per-batch mean reward mean(r_c ∪ r_r), updated with the current batch
  *before* the loss (so the very first batch is centred on its own mean), every batch weighing the same.
  `RewardShift` is that state; the caller owns it (and saves it with the checkpoint so a resumed run continues
  the same mean). Under data parallelism TRL averaged the batch means over ranks before updating; here each
  rank updates with its own batch, so ranks hold slightly different δ unless the caller reduces first. TRL 1.x
  dropped the shift (δ = 0); passing `reward_shift=None` gives that form.
- SFT = Σ_pairs (−log π(y_c)) / Σ_pairs |y_c|: the mean token NLL of the chosen responses, pooled over the
  batch. Pooled rather than a mean of per-response means because it is the token-weighted loss the SFT stage
  minimises (`keyeflow.training.trainer`), so w_sft = 1 puts the SFT term on the same scale as plain SFT, and
  a short chosen answer does not weigh as much as a long one; it is also TRL's `sft` loss type.
Label smoothing (cDPO) is left out: neither InternVL's MPO nor TRL's current sigmoid loss uses it.

**GSPO** (Group Sequence Policy Optimization, Zheng et al. 2025), G rollouts per prompt:

    J = mean_i min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i),  loss = −J (+ kl_coef · KL)
    Â_i = (r_i − mean_group r) / (std_group r + eps),
    s_i = exp((1/|y_i|) Σ_t [log π_θ(y_i,t) − log π_old(y_i,t)])

- std is the unbiased (Bessel-corrected) standard deviation over the G rewards of a prompt, and eps = 1e-4 is
  added to it — TRL's and verl's choice, so advantages match theirs; a group whose rewards are all equal has
  no signal and gets advantages of exactly 0 (set explicitly: r − mean is not always exactly 0 in floating
  point).
- The gradient is the paper's GSPO-token form: s_i,t = sg[s_i] · π_θ(y_i,t) / sg[π_θ(y_i,t)], averaged over
  the tokens of a response. Its value is s_i on every token and its gradient is s_i ∇log π_θ(y_i,t), so with
  one advantage per response the gradient equals the sequence form's,
  ∇J = mean_i Â_i s_i (1/|y_i|) Σ_t ∇log π_θ(y_i,t) (unclipped responses; clipped ones contribute nothing),
  while the per-token structure leaves room for token-level advantages later.
- Reduction: the mean over all responses of the batch (every response weighs the same whatever its length, as
  in the paper's (1/G) Σ_i; prompts weigh the same when every prompt has G responses), i.e. TRL's `grpo`
  reduction with `importance_sampling_level="sequence"`.
- The optional KL term is the per-token k3 estimator exp(ref − logp) − (ref − logp) − 1, averaged over each
  response's tokens then over responses, times `kl_coef` (default 0: the GSPO paper trains without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keyeflow.config import check_number, invalid


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_ids[..., t]) under logits[..., t, :], in float32: the picked logit minus the logsumexp,
    which never materialises the full log-softmax (the backward still builds the softmax once). The caller
    aligns them (the logit at position t scores the token at t + 1)."""
    logits = logits.float()
    picked = logits.gather(-1, token_ids[..., None])[..., 0]
    return picked - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------------------------------------- MPO


@dataclass(frozen=True, kw_only=True)
class MPOConfig:
    """MPO's hyperparameters: β of the implicit reward and the weight of each term (SPEC §4, InternVL's
    setting). A term with weight 0 is left out of the total (its value is still reported)."""

    beta: float = 0.1
    dpo_weight: float = 0.8
    bco_weight: float = 0.2
    sft_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_number("MPOConfig", "beta", self.beta, minimum=0, strict=True))
        for name in ("dpo_weight", "bco_weight", "sft_weight"):
            object.__setattr__(self, name, check_number("MPOConfig", name, getattr(self, name), minimum=0))
        if self.dpo_weight == self.bco_weight == self.sft_weight == 0.0:
            raise ValueError(
                "MPOConfig: dpo_weight, bco_weight and sft_weight are all 0, the loss would be 0"
            )


@dataclass
class RewardShift:
    """BCO's reward shift δ: the running mean of per-batch mean rewards, each batch counted once (TRL's
    `RunningMoments` fed one scalar per batch). Mutable on purpose: `mpo_loss` updates it in place; store
    `mean` and `num_batches` with the checkpoint."""

    mean: float = 0.0
    num_batches: int = 0

    def update(self, batch_mean: float) -> float:
        if not math.isfinite(batch_mean):
            raise ValueError(f"RewardShift.update: batch mean reward {batch_mean!r} is not finite")
        self.num_batches += 1
        self.mean += (batch_mean - self.mean) / self.num_batches
        return self.mean


@dataclass(frozen=True)
class MPOOutput:
    loss: torch.Tensor  # the weighted total, the one to backpropagate
    dpo: torch.Tensor  # each term's unweighted value (mean over pairs; SFT: mean over chosen tokens)
    bco: torch.Tensor
    sft: torch.Tensor
    chosen_rewards: torch.Tensor  # β · (log π − log π_ref) per pair, detached
    rejected_rewards: torch.Tensor
    reward_margin: torch.Tensor  # mean of chosen − rejected rewards
    reward_accuracy: torch.Tensor  # share of pairs whose chosen reward is higher
    bco_shift: float  # the δ the BCO term used


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"inputs must have one shape, got {shapes}")


def mpo_loss(
    config: MPOConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    *,
    reward_shift: RewardShift | None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MPOOutput:
    """MPO on a batch of pairs. Every input is one value per pair, shape (B,): the log-probabilities summed
    over the response tokens under the policy and the frozen reference, and the number of chosen response
    tokens. `reward_shift` (required, may be None) is updated with this batch before BCO uses it; None means
    δ = 0.

    A batch split over data-parallel ranks: `all_reduce` sums a tensor over the ranks (in place, returning
    it). Every term is then a sum over this rank's pairs divided by the whole batch's count (pairs for DPO and
    BCO, chosen tokens for SFT) and δ comes from the whole batch's mean reward, so the ranks' losses and
    gradients add up to the loss of the whole batch on one process; `loss`, `dpo`, `bco` and `sft` are this
    rank's shares, the reward statistics are the whole batch's. None: one process, the batch is all there is
    (the same numbers: a mean is computed as the sum divided by the count either way)."""
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_num_tokens=chosen_num_tokens,
    )
    if policy_chosen_logps.ndim != 1 or policy_chosen_logps.numel() == 0:
        raise ValueError(
            f"MPO inputs must be non-empty 1-D (one value per pair), got {policy_chosen_logps.shape}"
        )
    if bool((chosen_num_tokens < 1).any()):
        raise ValueError(
            f"every chosen response needs at least one token, got counts {chosen_num_tokens.tolist()}"
        )

    # float32 at least: summed log-probs run to the thousands, where bf16 cannot resolve a margin of 1.
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    policy_chosen_logps, policy_rejected_logps = (
        policy_chosen_logps.to(dtype),
        policy_rejected_logps.to(dtype),
    )
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)

    beta = config.beta
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    chosen_d, rejected_d = chosen_rewards.detach(), rejected_rewards.detach()

    # The whole batch's counts and reward sum (one collective on several ranks; see the docstring).
    totals = torch.stack(
        [
            torch.tensor(float(policy_chosen_logps.numel()), dtype=torch.float64),
            chosen_num_tokens.sum().double().cpu(),
            torch.cat([chosen_d, rejected_d]).double().sum().cpu(),
        ]
    )
    if all_reduce is not None:
        totals = all_reduce(totals.to(policy_chosen_logps.device)).cpu()
    num_pairs, num_tokens, reward_sum = int(totals[0].item()), totals[1].item(), totals[2].item()

    dpo = -F.logsigmoid(chosen_rewards - rejected_rewards).sum() / num_pairs

    # δ from the rewards before the gradient step, detached: it is a baseline, not something to optimise.
    delta = 0.0
    if reward_shift is not None:
        delta = reward_shift.update(reward_sum / (2 * num_pairs))
    bco = (
        -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    ).sum() / num_pairs

    sft = -policy_chosen_logps.sum() / torch.tensor(num_tokens, dtype=dtype)

    # Zero-weight terms are skipped rather than multiplied by 0, so an overflow in an unused term cannot turn
    # the total into NaN (0 · inf).
    total = sum(
        w * term
        for w, term in ((config.dpo_weight, dpo), (config.bco_weight, bco), (config.sft_weight, sft))
        if w
    )
    statistics = torch.stack([(chosen_d - rejected_d).sum(), (chosen_d > rejected_d).float().sum()])
    if all_reduce is not None:
        statistics = all_reduce(statistics)
    return MPOOutput(
        loss=total, dpo=dpo, bco=bco, sft=sft,
        chosen_rewards=chosen_d, rejected_rewards=rejected_d,
        reward_margin=statistics[0] / num_pairs,
        reward_accuracy=statistics[1] / num_pairs,
        bco_shift=delta,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- GSPO


@dataclass(frozen=True, kw_only=True)
class GSPOConfig:
    """GSPO's hyperparameters. The clipping range is tiny because it bounds a per-token *geometric mean* ratio
    (the paper's 3e-4 / 4e-4); `advantage_eps` keeps a near-constant group from blowing up its advantages."""

    epsilon_low: float = 3e-4
    epsilon_high: float = 4e-4
    kl_coef: float = 0.0
    advantage_eps: float = 1e-4

    def __post_init__(self) -> None:
        for name, strict in (
            ("epsilon_low", True),
            ("epsilon_high", True),
            ("kl_coef", False),
            ("advantage_eps", False),
        ):
            object.__setattr__(
                self, name, check_number("GSPOConfig", name, getattr(self, name), minimum=0, strict=strict)
            )
        if self.epsilon_low >= 1.0:
            raise invalid(
                "GSPOConfig",
                "epsilon_low",
                self.epsilon_low,
                "must be < 1 (the lower bound 1 − ε must stay > 0)",
            )


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Â = (r − mean) / (std + eps) within each row of `rewards` (num_prompts, G); std is Bessel-corrected.
    A row whose rewards are all equal gets 0 everywhere."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (num_prompts, group_size), got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group-normalised advantages need >= 2 rollouts per prompt, got {rewards.shape[1]}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)  # unbiased
    advantages = (rewards - mean) / (std + eps)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


@dataclass(frozen=True)
class GSPOOutput:
    loss: torch.Tensor  # policy_loss + kl_coef · kl, the one to backpropagate
    policy_loss: torch.Tensor  # −J
    kl: torch.Tensor | None  # mean k3 KL to the reference (None without ref_logps)
    ratio: torch.Tensor  # s_i per response, detached
    mean_ratio: torch.Tensor
    clip_low_fraction: torch.Tensor  # share of responses with s < 1 − ε_low and Â < 0 (no gradient)
    clip_high_fraction: torch.Tensor  # share with s > 1 + ε_high and Â > 0 (no gradient)
    clip_fraction: torch.Tensor  # their sum


def gspo_loss(
    config: GSPOConfig,
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
) -> GSPOOutput:
    """GSPO on N responses padded to T tokens: `logps` (N, T) per-token log-probs under the current policy
    (with grad), `advantages` (N,) one per response (`group_advantages(...).flatten()`), `mask` (N, T) true on
    response tokens. `old_logps` (N, T) are the behaviour policy's (None: on-policy, s = 1 exactly);
    `ref_logps` (N, T) the reference's, needed when `config.kl_coef` > 0. Values at masked positions are
    ignored, NaN included."""
    if logps.ndim != 2:
        raise ValueError(f"logps must be (num_responses, num_tokens), got shape {tuple(logps.shape)}")
    if mask.shape != logps.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logps shape {tuple(logps.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"advantages must be one per response, shape ({logps.shape[0]},), got {tuple(advantages.shape)}"
        )
    for name, other in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if other is not None and other.shape != logps.shape:
            raise ValueError(
                f"{name} shape {tuple(other.shape)} differs from logps shape {tuple(logps.shape)}"
            )
    if config.kl_coef > 0 and ref_logps is None:
        raise ValueError(f"GSPOConfig.kl_coef={config.kl_coef} needs ref_logps")
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(
            f"responses {torch.nonzero(lengths == 0).flatten().tolist()} have no tokens: the "
            "length-normalised ratio is undefined"
        )

    # float32 at least: the clipping range (3e-4) is far below bf16's resolution near 1 (about 4e-3).
    dtype = torch.promote_types(logps.dtype, torch.float32)
    # Zero the padding before any arithmetic: a NaN or -inf there would otherwise reach the gradient through
    # exp/min even though the masked mean never selects it (0 · NaN = NaN in the backward).
    zero = torch.zeros((), dtype=dtype, device=logps.device)
    logps = torch.where(mask, logps.to(dtype), zero)
    old = logps.detach() if old_logps is None else torch.where(mask, old_logps.to(dtype), zero)
    lengths_f = lengths.to(dtype)

    def response_mean(per_token: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, per_token, zero).sum(dim=1) / lengths_f

    log_ratio = response_mean(logps - old)  # log s_i
    # GSPO-token: value s_i on every token, gradient s_i · ∇log π_θ(y_t) (sg = detach). The bracket is exactly
    # 0 in value; written as (a + x) − x instead, rounding could move a ratio across the tiny clipping bounds.
    token_ratio = torch.exp(log_ratio.detach()[:, None] + (logps - logps.detach()))
    adv = advantages.to(dtype)[:, None]
    clipped = torch.clamp(token_ratio, 1.0 - config.epsilon_low, 1.0 + config.epsilon_high)
    objective = response_mean(torch.minimum(token_ratio * adv, clipped * adv))
    policy_loss = -objective.mean()

    kl = None
    loss = policy_loss
    if ref_logps is not None:
        ref = torch.where(mask, ref_logps.to(dtype), zero)
        kl = response_mean(torch.exp(ref - logps) - (ref - logps) - 1.0).mean()
        if config.kl_coef > 0:
            loss = policy_loss + config.kl_coef * kl

    ratio = torch.exp(log_ratio.detach())
    low = ((ratio < 1.0 - config.epsilon_low) & (advantages < 0)).float().mean()
    high = ((ratio > 1.0 + config.epsilon_high) & (advantages > 0)).float().mean()
    return GSPOOutput(
        loss=loss,
        policy_loss=policy_loss,
        kl=kl,
        ratio=ratio,
        mean_ratio=ratio.mean(),
        clip_low_fraction=low,
        clip_high_fraction=high,
        clip_fraction=low + high,
    )
