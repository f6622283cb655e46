"""Cost model, packing and LPT balancing on literal inputs."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from keyeflow.training.balance import (
    CostModel,
    SampleCost,
    VisionGrid,
    balance,
    group_loads,
    imbalance,
    pack,
    pack_lengths,
    real_token_share,
    vit_coefficients,
)

# ---------------------------------------------------------------------------------------------- costs


def test_default_coefficients_are_the_text_proxy_and_siglip_against_the_8b_llm():
    model = CostModel()
    assert model.llm_linear == 24576.0 and model.llm_quadratic == 1.0
    # 27 layers × 2·(4·1152² + 2·1152·4304) FLOPs per patch over 4·4096·36; 27·4·1152 over the same.
    assert model.vit_linear == pytest.approx(27 * 2 * (4 * 1152**2 + 2 * 1152 * 4304) / (4 * 4096 * 36))
    assert model.vit_linear == pytest.approx(1393.875)
    assert model.vit_quadratic == 0.2109375
    # The proxy's 24576 is 6·d for d = 4096.
    assert (
        CostModel.from_model_sizes(
            vit_layers=27, vit_hidden=1152, vit_mlp=4304, llm_layers=36, llm_hidden=4096
        )
        == model
    )
    assert vit_coefficients(vit_layers=1, vit_hidden=1, vit_mlp=1, llm_layers=1, llm_hidden=1) == (3.0, 1.0)


def test_text_sample_cost_is_the_public_proxy():
    assert CostModel().cost(SampleCost(1000)) == 24576 * 1000 + 1000**2
    assert CostModel().llm_cost(np.array([1, 2])).tolist() == [24577.0, 49156.0]


def test_vision_cost_is_per_grid_with_slow_and_fast_frames_apart():
    model = CostModel(llm_linear=10, llm_quadratic=1, vit_linear=2, vit_quadratic=0.5)
    # 2 Slow frames of 16 patches, 3 Fast frames of 4 patches, 100 LLM tokens.
    video = SampleCost.video(100, num_slow=2, slow_patches=16, num_fast=3, fast_patches=4, sample_id="v")
    vit = 2 * (2 * 16 + 0.5 * 16**2) + 3 * (2 * 4 + 0.5 * 4**2)
    assert model.vit_cost(video) == vit == 2 * 160 + 3 * 16
    assert model.cost(video) == 10 * 100 + 100**2 + vit
    # The same patches in one grid cost more: attention is quadratic within a grid, not across grids.
    one_grid = SampleCost(100, (VisionGrid(2 * 16 + 3 * 4),))
    assert model.vit_cost(one_grid) > model.vit_cost(video)
    # Same token count, more Slow frames: costlier (a length-only cost cannot tell these apart).
    slow_heavy = SampleCost.video(100, num_slow=4, slow_patches=16, num_fast=0, fast_patches=4)
    assert model.cost(slow_heavy) > model.cost(video)


def test_cost_model_and_sample_validation():
    with pytest.raises(ValueError, match=r"CostModel.vit_linear=-1.0: must be finite and >= 0"):
        CostModel(vit_linear=-1)
    with pytest.raises(ValueError, match="CostModel.llm_linear='x': must be a number"):
        CostModel(llm_linear="x")
    with pytest.raises(ValueError, match=r"sample 'a': num_tokens=0 must be >= 1"):
        SampleCost(0, sample_id="a")
    with pytest.raises(ValueError, match="VisionGrid.kind='frame'"):
        VisionGrid(4, 1, "frame")
    with pytest.raises(ValueError, match="VisionGrid.count=-1"):
        VisionGrid(4, -1)


# ---------------------------------------------------------------------------------------------- packing


def test_pack_best_fit_decreasing_literal():
    # Sorted: 5(0) 5(1) 4(2) 3(3) 3(4) 2(5) 1(6) 1(7); 3s close the 5s, 2+1+1 joins the 4.
    assert pack_lengths([5, 5, 4, 3, 3, 2, 1, 1], 8) == [[0, 3], [1, 4], [2, 5, 6, 7]]
    assert real_token_share([5, 5, 4, 3, 3, 2, 1, 1], [[0, 3], [1, 4], [2, 5, 6, 7]], 8) == 1.0
    # Best fit, not first fit: the 2 goes where it leaves least room (pack 1: 7 + 2 = 9 of 10).
    assert pack_lengths([6, 7, 2], 10) == [[1, 2], [0]]


def test_pack_breaks_ties_on_room_by_the_cheaper_pack():
    # Two packs with 4 tokens of room each; the 4-token sample joins the cheaper one.
    assert pack_lengths([6, 6, 4], 10, costs=[100.0, 1.0, 5.0]) == [[0], [1, 2]]
    assert pack_lengths([6, 6, 4], 10, costs=[1.0, 100.0, 5.0]) == [[1], [0, 2]]


def test_pack_never_splits_and_names_an_over_length_sample():
    samples = [SampleCost(10, sample_id="short"), SampleCost(300, sample_id="long-video")]
    with pytest.raises(ValueError, match=r"sample 'long-video' has 300 tokens, more than max_length 256"):
        pack(samples, 256)
    with pytest.raises(ValueError, match="max_length=0"):
        pack_lengths([1], 0)
    with pytest.raises(ValueError, match="sample #1 has 0 tokens"):
        pack_lengths([1, 0], 8)


def test_pack_places_every_sample_exactly_once_and_fills_sequences():
    rng = random.Random(0)
    lengths = [rng.randint(1, 4096) for _ in range(300)] + [rng.randint(1, 64) for _ in range(2000)]
    packs = pack_lengths(lengths, 8192)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 8192 for p in packs)
    # Lower bound on packs is ceil(total / capacity); many short samples fill every hole.
    assert len(packs) == -(-sum(lengths) // 8192)
    assert real_token_share(lengths, packs, 8192) > 0.99


def test_pack_samples_uses_their_costs():
    model = CostModel()
    samples = [
        SampleCost(6, sample_id="a"),
        SampleCost(6, (VisionGrid(1000),), sample_id="video"),
        SampleCost(4, sample_id="b"),
    ]
    # Equal lengths: the costlier (the one with a grid) is placed first, so it opens pack 0, and the
    # 4-token sample joins the cheaper pack.
    assert pack(samples, 10, model) == [[1], [0, 2]]


# ---------------------------------------------------------------------------------------------- balancing


def test_lpt_classic_worst_case_is_four_thirds_minus_one_over_three_m():
    # Graham's tight example for m = 2: LPT gives 7, the optimum is 6 ({3,3} / {2,2,2}).
    costs = [3, 3, 2, 2, 2]
    assignment = balance(costs, 2)
    assert assignment.tolist() == [0, 1, 0, 1, 0]  # 3→0, 3→1, 2→0 (tie: lowest), 2→1, 2→0
    assert group_loads(costs, assignment, 2).tolist() == [7.0, 5.0]
    assert 7 / 6 == pytest.approx(4 / 3 - 1 / (3 * 2))


def test_lpt_literal_assignment_and_ties():
    # 5→0, 4→1, 3→1 (4 < 5), 2→0 (5 < 7), 1→0 (7 = 7: lowest group): loads 8 / 7
    assert balance([5, 1, 4, 2, 3], 2).tolist() == [0, 0, 1, 0, 1]
    assert balance([1, 1, 1, 1], 4).tolist() == [0, 1, 2, 3]  # ties in index order, groups by lowest index
    assert balance([], 3).tolist() == []
    assert balance([9.0], 1).tolist() == [0]
    assert group_loads([1, 2], [0, 0], 3).tolist() == [3.0, 0.0, 0.0]
    assert imbalance([2, 2, 2]) == 1.0 and imbalance([3, 1]) == 1.5
    with pytest.raises(ValueError, match="num_groups=0"):
        balance([1], 0)
    with pytest.raises(ValueError, match="costs must be finite and >= 0"):
        balance([1, -1], 2)


def _optimum(costs: list[float], m: int) -> float:
    best = float("inf")
    for groups in itertools.product(range(m), repeat=len(costs)):
        loads = [0.0] * m
        for c, g in zip(costs, groups):
            loads[g] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("m", [2, 3, 4])
def test_lpt_within_grahams_bound_of_the_optimum(m):
    rng = random.Random(m)
    for _ in range(40):
        costs = [rng.randint(1, 50) for _ in range(rng.randint(1, 8))]
        lpt = group_loads(costs, balance(costs, m), m).max()
        opt = _optimum(costs, m)
        assert lpt <= (4 / 3 - 1 / (3 * m)) * opt + 1e-9
        # And within one item of the mean (LPT's last item went to the least-loaded group).
        assert lpt <= sum(costs) / m + max(costs) + 1e-9


def test_lpt_beats_an_equal_count_split_on_heavy_tailed_costs():
    rng = np.random.default_rng(0)
    costs = rng.lognormal(0, 1.5, 400)
    lpt = imbalance(group_loads(costs, balance(costs, 8), 8))
    split = imbalance(group_loads(costs, np.arange(400) % 8, 8))
    assert lpt < 1.01 < split


def test_two_level_balance_across_ranks_then_micro_batches():
    from keyeflow.training.balance import balance_two_level

    rank, micro = balance_two_level([8, 7, 6, 5, 4, 3, 2, 1], 2, 2)
    # Ranks: 8→0, 7→1, 6→1, 5→0, 4→0, 3→1, 2→1, 1→0: loads 18 / 18.
    assert rank.tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    # Rank 0 has 8, 5, 4, 1 → micro-batches 8+1 / 5+4; rank 1 has 7, 6, 3, 2 → 7+2 / 6+3.
    assert micro.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert group_loads([8, 5, 4, 1], micro[rank == 0], 2).tolist() == [9.0, 9.0]
