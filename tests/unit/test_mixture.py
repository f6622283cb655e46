"""Mixture configs, recipes, quota planning and the chart, on literal inputs (no tables)."""

from __future__ import annotations

import io
import math

import pytest
from matplotlib.figure import Figure

from keyeflow.datasets import mixture
from keyeflow.datasets.mixture import (
    MixtureConfig,
    MixtureReport,
    MixtureShortfall,
    ModalityReport,
    plan_quotas,
    stage_mixture,
)
from keyeflow.datasets.mixture_figures import shares_chart

SHARES = {"video": 0.24, "image": 0.50, "text": 0.26}


def config(**overrides) -> MixtureConfig:
    return MixtureConfig(**{"stage": 3, "target_shares": SHARES, "max_sample_tokens": 131_072, **overrides})


# ---------------------------------------------------------------------------------------------- config


def test_stage_recipes():
    one, two, three = stage_mixture(1), stage_mixture(2), stage_mixture(3)
    assert one.target_shares == {"image": 1.0} and one.tasks == ("caption",) and one.max_sample_tokens == 8192
    assert two.target_shares == {"video": 0.2, "image": 0.6, "text": 0.2} and two.max_sample_tokens == 8192
    assert three.target_shares == SHARES and three.tasks is None and three.max_sample_tokens == 131_072
    assert stage_mixture(3, seed=7, upsample=True, max_repeats=4).max_repeats == 4
    with pytest.raises(ValueError, match="stage 4 is fusion"):
        stage_mixture(4)
    with pytest.raises(ValueError, match=r"unknown or fixed MixtureConfig override\(s\) \['shares'\]"):
        stage_mixture(3, shares={"image": 1.0})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_shares": {"video": 0.3, "image": 0.5, "text": 0.26}}, "must sum to 1"),
        ({"target_shares": {"audio": 1.0}}, "unknown modality 'audio'"),
        ({"target_shares": {"image": 1.5, "text": -0.5}}, "share of 'text' must be >= 0"),
        ({"max_repeats": 3}, "only applies with upsample=True"),
        ({"max_repeats": 0.5, "upsample": True}, "must be >= 1"),
        ({"source_weights": {"a": -1}}, "weight of 'a' must be >= 0"),
        ({"source_weights": {"a": float("nan")}}, "finite number"),
        ({"tasks": "caption"}, "sequence of task names"),
        ({"tasks": ()}, "empty task list"),
        ({"tolerance_pp": 0}, r"must be in \(0, 100\]"),
        ({"total_tokens": 0}, "must be >= 1"),
        ({"max_sample_tokens": 12.5}, "must be an integer"),
        ({"upsample": "yes"}, "True or False"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_config_hash_is_stable_and_sensitive():
    a = config(target_shares={"text": 0.26, "image": 0.5, "video": 0.24})
    b = config(target_shares={"video": 0.24, "image": 0.50, "text": 0.26})
    assert a.config_hash() == b.config_hash()
    assert (
        config(upsample=True, max_repeats=2.0).config_hash()
        == config(upsample=True, max_repeats=2).config_hash()
    )
    assert config(seed=1).config_hash() != a.config_hash()
    assert config(source_weights={"x": 3}).config_hash() != a.config_hash()
    # Within 1e-9 counts as summing to one (shares typed as decimals rarely add up exactly).
    config(target_shares={"video": 0.1, "image": 0.2, "text": 0.7})


def test_caller_dicts_are_copied():
    weights = {"a": 3.0}
    cfg = config(source_weights=weights)
    weights["a"] = 100.0
    assert cfg.source_weights == {"a": 3.0}


# ---------------------------------------------------------------------------------------------- planning


def test_default_size_is_the_largest_the_data_gives():
    available = [("video", "v", 240, 10), ("image", "i", 10_000, 10), ("text", "t", 10_000, 10)]
    plan = plan_quotas(available, config())
    assert plan.total_tokens == pytest.approx(1000)  # video is binding: 240 / 0.24
    assert plan.quotas == pytest.approx({"video": 240, "image": 500, "text": 260})
    video = next(p for p in plan.sources if p.modality == "video")
    assert (video.full_passes, video.remainder) == (1, 0.0)


def test_weights_split_a_modality_and_short_sources_give_the_rest_to_others():
    available = [("image", "a", 1_000, 10), ("image", "b", 1_000, 10), ("image", "c", 100, 1)]
    cfg = MixtureConfig(
        stage=1,
        target_shares={"image": 1.0},
        max_sample_tokens=8192,
        total_tokens=1_000,
        source_weights={"a": 3, "b": 1, "c": 4},
    )
    plan = plan_quotas(available, cfg)
    quotas = {p.source: p.quota for p in plan.sources}
    # c asks for 4/8 = 500 but has 100: it gives all of it, a and b split the other 900 at 3:1.
    assert quotas == pytest.approx({"a": 675, "b": 225, "c": 100})
    assert sum(quotas.values()) == pytest.approx(1_000)


def test_shortfall_names_modality_missing_tokens_and_the_fix():
    available = [("video", "v", 1_000, 10), ("image", "i", 100_000, 10), ("text", "t", 100_000, 10)]
    with pytest.raises(MixtureShortfall) as info:
        plan_quotas(available, config(total_tokens=10_000))
    message = str(info.value)
    assert "video is short by 1,400 tokens" in message  # 0.24 × 10,000 − 1,000
    assert "upsample=True with max_repeats >= 3" in message  # 2.4 passes needed
    assert "total_tokens <= 4,166" in message
    assert info.value.shortfalls[0].modality == "video"


def test_upsample_repeats_up_to_the_cap_then_reports():
    available = [("video", "v", 1_000, 10), ("image", "i", 100_000, 10), ("text", "t", 100_000, 10)]
    plan = plan_quotas(available, config(total_tokens=10_000, upsample=True, max_repeats=3))
    video = next(p for p in plan.sources if p.modality == "video")
    assert (video.full_passes, video.remainder) == (2, pytest.approx(400))
    assert not plan.shortfalls
    short = plan_quotas(available, config(total_tokens=10_000, upsample=True, max_repeats=2))
    assert short.quotas["video"] == 2_000 and short.shortfalls[0].missing_tokens == pytest.approx(400)


def test_a_modality_with_no_tokens_always_falls_short():
    available = [("image", "i", 100_000, 10), ("text", "t", 100_000, 10)]
    with pytest.raises(MixtureShortfall, match="no eligible video tokens"):
        plan_quotas(available, config(upsample=True, max_repeats=10))


def test_fractional_cap_limits_passes():
    available = [("video", "v", 1_000, 10), ("image", "i", 100_000, 10), ("text", "t", 100_000, 10)]
    plan = plan_quotas(available, config(upsample=True, max_repeats=2.5))
    video = next(p for p in plan.sources if p.modality == "video")
    assert plan.total_tokens == pytest.approx(2_500 / 0.24)
    assert (video.full_passes, video.remainder, video.cap_tokens) == (2, pytest.approx(500), 2_500)
    assert config(upsample=True, max_repeats=2.5).sample_repeat_cap == 3


# ---------------------------------------------------------------------------------------------- chart


def test_shares_chart_has_target_and_reached_bars_with_percentages():
    modalities = [
        ModalityReport("video", 0.24, 100, 1, 240, 241, 0.241, 1, 1, 1, 1.0),
        ModalityReport("image", 0.50, 100, 1, 500, 500, 0.500, 1, 1, 1, 1.0),
        ModalityReport("text", 0.26, 100, 1, 260, 259, 0.259, 1, 1, 1, 1.0),
    ]
    report = MixtureReport("abc", 3, "h", 0, 1, None, 1000, 1000, 1000, 3, 0.5, 1, modalities, [], [])
    fig = shares_chart(report)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 6
    labels = [t.get_text() for t in ax.texts]
    assert {"24.0%", "50.0%", "26.0%", "24.10%", "50.00%", "25.90%"} <= set(labels)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_reached_shares_sql_quotes_the_id():
    text = mixture.reached_shares_sql("ab'c")
    assert "mixture_id = 'ab''c'" in text and "sum(num_tokens * repeats)" in text
    assert math.isclose(sum(SHARES.values()), 1.0)
