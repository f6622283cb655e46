"""MixtureLoader over real Lance tables (train_samples, video_samples, image_samples, mixtures) and DuckDB.

The sample reader below is the loader's seam to the model processor: it returns each sample's metadata
and a tensor of its length, and counts what it was asked for.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from keyeflow.datasets import tables
from keyeflow.datasets.mixture import build_mixture, stage_mixture
from keyeflow.training.balance import CostModel, SampleCost
from keyeflow.training.loader import MixtureLoader, epoch_stream

MAX_LENGTH = 4096
WINDOW = 64


def _rows(seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    train, videos, images = [], [], []

    def train_row(sample_id, modality, text, vision, media):
        return {
            "sample_id": sample_id,
            "source": f"{modality}-src",
            "task": "caption" if media else "text",
            "modality": modality,
            "num_tokens": text + vision,
            "num_text_tokens": text,
            "num_vision_tokens": vision,
            "media_ids": media,
            "source_uri": f"file:///{sample_id}",
            "content_hash": sample_id,
            "config_hash": "tok-v1",
            "messages": "[]",
            "created_at": tables.now(),
        }

    for i in range(12):  # few videos: upsampled up to 3×
        num_frames = rng.randint(20, 60)
        num_slow = rng.randint(2, num_frames // 3)
        slow, fast = rng.choice([(224, 224), (280, 168)]), (112, 112)
        slow_tokens, fast_tokens = slow[0] * slow[1] // 784, fast[0] * fast[1] // 784
        vision = num_slow * slow_tokens + (num_frames - num_slow) * fast_tokens
        media_id = f"vs-{i:03d}"
        videos.append(
            {
                "sample_id": media_id,
                "video_id": f"vid-{i}",
                "uri": f"file:///v{i}.mp4",
                "config_hash": "sf",
                "preset": "paper",
                "sampling_fps": 2.0,
                "num_frames": num_frames,
                "num_slow": num_slow,
                "num_fast": num_frames - num_slow,
                "frame_types": [0] * num_slow + [1] * (num_frames - num_slow),
                "timestamps": [k / 2 for k in range(num_frames)],
                "slow_height": slow[0],
                "slow_width": slow[1],
                "fast_height": fast[0],
                "fast_width": fast[1],
                "slow_tokens": slow_tokens,
                "fast_tokens": fast_tokens,
                "total_tokens": vision,
                "token_budget": 4000,
                "created_at": tables.now(),
            }
        )
        train.append(train_row(f"video-{i:03d}", "video", rng.randint(20, 120), vision, [media_id]))
    for i in range(60):
        grid_h, grid_w = 2 * rng.randint(8, 40), 2 * rng.randint(8, 40)
        media_id = f"is-{i:03d}"
        images.append(
            {
                "sample_id": media_id,
                "image_id": f"img-{i}",
                "uri": f"file:///i{i}.png",
                "config_hash": "im",
                "height": grid_h * 14,
                "width": grid_w * 14,
                "grid_h": grid_h,
                "grid_w": grid_w,
                "num_tokens": grid_h * grid_w // 4,
                "patches": bytes(grid_h * grid_w * 588),
                "created_at": tables.now(),
            }
        )
        train.append(
            train_row(f"image-{i:03d}", "image", rng.randint(10, 80), grid_h * grid_w // 4, [media_id])
        )
    for i in range(300):
        train.append(train_row(f"text-{i:03d}", "text", rng.randint(40, 600), 0, []))
    return train, videos, images


@pytest.fixture()
def mixture(home):
    train, videos, images = _rows()
    tables.upsert("video_samples", videos)
    tables.upsert("image_samples", images)
    tables.upsert("train_samples", train)
    config = stage_mixture(3, max_sample_tokens=MAX_LENGTH, upsample=True, max_repeats=3)
    result = build_mixture(tables.ref("train_samples"), config)
    return result, {row["sample_id"]: row for row in train}, {row["sample_id"]: row for row in videos}


class Reader:
    """The seam: metadata plus a tensor of the sample's length; records every call."""

    def __init__(self, train: dict[str, dict]):
        self.train = train
        self.calls: list[list[str]] = []

    def __call__(self, sample_ids: list[str]):
        self.calls.append(list(sample_ids))
        return [
            {
                "sample_id": s,
                "num_tokens": self.train[s]["num_tokens"],
                "input_ids": torch.zeros(self.train[s]["num_tokens"], dtype=torch.long),
            }
            for s in sample_ids
        ]


def make(result, train, *, rank=0, world_size=2, micro_batches=3, seed=0, window=WINDOW, **kwargs):
    reader = Reader(train)
    loader = MixtureLoader(
        result.mixture,
        result.mixture_id,
        rank=rank,
        world_size=world_size,
        max_length=MAX_LENGTH,
        micro_batches_per_step=micro_batches,
        seed=seed,
        sample_reader=reader,
        window_size=window,
        **kwargs,
    )
    return loader, reader


def mixture_occurrences(result) -> Counter:
    table = tables.open_table("mixtures", version=result.mixture.version).to_table(
        columns=["sample_id", "repeats"], filter=f"mixture_id = '{result.mixture_id}'"
    )
    return Counter(
        {s: r for s, r in zip(table.column("sample_id").to_pylist(), table.column("repeats").to_pylist())}
    )


def key(batch) -> tuple:
    return (batch.step, batch.index, tuple((p.sample_ids, p.occurrences) for p in batch.packs))


def test_each_rank_reads_only_its_samples_and_an_epoch_covers_every_occurrence_once(mixture):
    result, train, _ = mixture
    expected = mixture_occurrences(result)
    assert max(expected.values()) > 1  # the test data is upsampled: repeats expand into occurrences
    world = 3
    seen_occurrences: list[int] = []
    seen_samples: Counter = Counter()
    read_by_rank = []
    for rank in range(world):
        loader, reader = make(result, train, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == loader.num_steps * 3
        # One reader call per non-empty micro-batch, for exactly that micro-batch's samples.
        assert reader.calls == [b.sample_ids for b in batches if b.packs]
        for b in batches:
            for pack, payloads in zip(b.packs, b.payloads):
                assert sum(pack.num_tokens) <= MAX_LENGTH
                assert [p["sample_id"] for p in payloads] == list(pack.sample_ids)
                assert [len(p["input_ids"]) for p in payloads] == list(pack.num_tokens)
            seen_occurrences += b.occurrences
            seen_samples.update(b.sample_ids)
        read_by_rank.append(Counter(s for call in reader.calls for s in call))
    assert sorted(seen_occurrences) == list(range(loader.occurrences_per_epoch))
    assert seen_samples == expected
    # Ranks read disjoint occurrences, and together exactly the epoch: nobody reads another rank's payload.
    assert sum(read_by_rank, Counter()) == expected


def test_plan_is_the_same_on_every_rank_and_deterministic(mixture):
    result, train, _ = mixture
    a, _ = make(result, train, rank=0)
    b, _ = make(result, train, rank=1)
    for w in range(a.num_steps):
        pa_, pb = a.plan_window(w), b.plan_window(w)
        assert np.array_equal(pa_.occurrences, pb.occurrences)
        assert all(np.array_equal(x, y) for x, y in zip(pa_.packs, pb.packs))
        assert np.array_equal(pa_.pack_rank, pb.pack_rank)
        assert np.array_equal(pa_.pack_micro_batch, pb.pack_micro_batch)
        assert pa_.real_token_share > 0.5
    again, _ = make(result, train, rank=0)
    assert [key(x) for x in a] == [key(y) for y in again]


def test_costs_come_from_the_frame_grids(mixture):
    result, train, videos = mixture
    loader, _ = make(result, train)
    assert loader.samples.num_samples_without_grids == 0
    i = list(loader.samples.sample_ids).index("video-003")
    v = videos["vs-003"]
    expected = SampleCost.video(
        train["video-003"]["num_tokens"],
        num_slow=v["num_slow"],
        slow_patches=(v["slow_height"] // 14) * (v["slow_width"] // 14),
        num_fast=v["num_fast"],
        fast_patches=64,
    )
    assert loader.samples.costs[i] == pytest.approx(CostModel().cost(expected))


def test_epochs_spread_repeats_and_later_epochs_are_reshuffled(mixture):
    # Row i's r uses sit at keys (i + j·N)/r: row 0 used twice of N = 4 rows at 0 and 2; every row used
    # twice gives two passes in order.
    assert epoch_stream(np.array([2, 1, 1, 1])).tolist() == [0, 1, 0, 2, 3]
    assert epoch_stream(np.array([2, 2, 2])).tolist() == [0, 1, 2, 0, 1, 2]
    result, train, _ = mixture
    loader, _ = make(result, train, num_epochs=2)
    first, second = loader.stream(0), loader.stream(1)
    assert sorted(first.tolist()) == sorted(second.tolist()) and not np.array_equal(first, second)
    occurrences = [o for b in loader for o in b.occurrences]
    assert set(occurrences) <= set(range(2 * loader.occurrences_per_epoch))


def run(loader, num_batches):
    out, it = [], iter(loader)
    for _ in range(num_batches):
        out.append(next(it))
    return out


def test_resume_mid_epoch_same_world_size_gives_the_identical_remaining_sequence(mixture):
    result, train, _ = mixture
    world = 2
    full = [[key(b) for b in make(result, train, rank=r, world_size=world)[0]] for r in range(world)]
    for stop in (7, 9):  # mid-window (step 2, micro-batch 1) and at a step boundary (after step 2)
        states = []
        for r in range(world):
            loader, _ = make(result, train, rank=r, world_size=world)
            run(loader, stop)
            states.append(json.loads(json.dumps(loader.state_dict())))  # survives a JSON checkpoint
        assert states[0] == states[1]  # every rank saves the same position
        assert states[0]["window"] == (2 if stop == 7 else 3)
        for r in range(world):
            resumed, _ = make(result, train, rank=r, world_size=world)
            resumed.load_state_dict(states[r])
            assert [key(b) for b in resumed] == full[r][stop:]


def test_resume_from_two_ranks_on_one_rank_continues_at_the_same_sample(mixture):
    result, train, _ = mixture
    before, states = [], []
    for r in range(2):
        loader, _ = make(result, train, rank=r, world_size=2)
        batches = run(loader, 3 * 2 + 2)  # steps 0-1 and two micro-batches of step 2
        before += [o for b in batches for o in b.occurrences]
        states.append(loader.state_dict())
    window_2 = set(loader.window_occurrences(2).tolist())
    consumed = set(states[0]["consumed"])
    assert consumed < window_2 and consumed == {o for o in before if o in window_2}

    single, reader = make(result, train, rank=0, world_size=1, micro_batches=2)
    single.load_state_dict(states[0])
    after = list(single)
    # The first step after the resume is exactly what was left of window 2, re-planned for one rank.
    first_step = [o for b in after if b.step == 2 for o in b.occurrences]
    assert sorted(first_step) == sorted(window_2 - consumed)
    assert len([b for b in after if b.step == 2]) == 2
    # Later windows hold the same occurrences as on any world size; nothing skipped or repeated.
    later = [o for b in after if b.step == 3 for o in b.occurrences]
    assert sorted(later) == single.window_occurrences(3).tolist()
    everything = before + [o for b in after for o in b.occurrences]
    assert sorted(everything) == list(range(single.occurrences_per_epoch))
    assert Counter(s for call in reader.calls for s in call) == Counter(
        single.samples.sample_ids[
            single.rows_of(np.array([o for b in after for o in b.occurrences]))
        ].tolist()
    )


def test_resume_twice_across_world_sizes_inside_one_window(mixture):
    # 2 ranks → 1 rank (stops inside the re-planned window) → 3 ranks: still every occurrence once.
    result, train, _ = mixture
    seen = []
    state = None
    for world, micro_batches, take in ((2, 3, 4), (1, 4, 2), (3, 2, None)):
        loaders = [
            make(result, train, rank=r, world_size=world, micro_batches=micro_batches)[0]
            for r in range(world)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
            batches = list(loader) if take is None else run(loader, take)
            seen += [o for b in batches for o in b.occurrences]
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states)
        state = states[0]
    assert sorted(seen) == list(range(loaders[0].occurrences_per_epoch))


def test_resume_refuses_another_stream_and_errors_are_clear(mixture):
    result, train, _ = mixture
    loader, _ = make(result, train)
    run(loader, 4)
    state = loader.state_dict()
    other_seed, _ = make(result, train, seed=1)
    with pytest.raises(ValueError, match="state has seed=0, this loader has 1"):
        other_seed.load_state_dict(state)
    other_window, _ = make(result, train, window=32)
    with pytest.raises(ValueError, match="state has window_size=64, this loader has 32"):
        other_window.load_state_dict(state)
    with pytest.raises(ValueError, match=r"more than max_length 100"):
        MixtureLoader(
            result.mixture,
            result.mixture_id,
            rank=0,
            world_size=1,
            max_length=100,
            micro_batches_per_step=1,
            seed=0,
            sample_reader=Reader(train),
            window_size=8,
        )
    with pytest.raises(ValueError, match="rank=2: must be < world_size=2"):
        make(result, train, rank=2)
    bad = MixtureLoader(
        result.mixture,
        result.mixture_id,
        rank=0,
        world_size=1,
        max_length=MAX_LENGTH,
        micro_batches_per_step=1,
        seed=0,
        sample_reader=lambda ids: [],
        window_size=8,
    )
    with pytest.raises(ValueError, match=r"sample_reader returned 0 payloads for \d+ sample ids"):
        next(iter(bad))
    with pytest.raises(ValueError, match="has no rows"):
        MixtureLoader(
            result.mixture,
            "nope",
            rank=0,
            world_size=1,
            max_length=MAX_LENGTH,
            micro_batches_per_step=1,
            seed=0,
            sample_reader=Reader(train),
            window_size=8,
        )


# ---------------------------------------------------------------------------------------------- token budget

BUDGET = 2 * MAX_LENGTH


def test_a_token_budget_caps_every_micro_batch_and_steps_stay_in_lock_step(mixture):
    result, train, _ = mixture
    world = 2
    per_rank = [
        list(
            make(result, train, rank=r, world_size=world, micro_batches=1, max_tokens_per_micro_batch=BUDGET)[
                0
            ]
        )
        for r in range(world)
    ]
    assert all(b.num_tokens <= BUDGET for batches in per_rank for b in batches)
    # Every rank has the same number of micro-batches in every step (lock-step data parallelism), at least
    # micro_batches_per_step, and more than that where the budget needs it.
    counts = [Counter(b.step for b in batches) for batches in per_rank]
    assert counts[0] == counts[1]
    assert all(b.num_micro_batches == counts[0][b.step] for batches in per_rank for b in batches)
    assert min(counts[0].values()) >= 1 and max(counts[0].values()) > 1
    # Still every occurrence of the epoch exactly once; and with no budget the plan is what it always was.
    seen = sorted(o for batches in per_rank for b in batches for o in b.occurrences)
    assert seen == list(range(make(result, train)[0].occurrences_per_epoch))
    plain, _ = make(result, train, micro_batches=1)
    assert max(b.num_tokens for b in plain) > BUDGET  # the cap binds: without it some micro-batch is over
    assert "max_tokens_per_micro_batch" not in plain.state_dict()["layout"]
    with pytest.raises(ValueError, match="must be >= max_length"):
        make(result, train, max_tokens_per_micro_batch=MAX_LENGTH - 1)


def test_a_token_budget_plan_resumes_exactly_also_on_another_world_size(mixture):
    result, train, _ = mixture
    full = [
        key(b)
        for b in make(
            result, train, rank=0, world_size=2, micro_batches=1, max_tokens_per_micro_batch=BUDGET
        )[0]
    ]
    for stop in (5, 8):
        states = []
        for r in range(2):
            loader, _ = make(
                result, train, rank=r, world_size=2, micro_batches=1, max_tokens_per_micro_batch=BUDGET
            )
            run(loader, stop)
            states.append(json.loads(json.dumps(loader.state_dict())))
        assert states[0] == states[1]
        resumed, _ = make(
            result, train, rank=0, world_size=2, micro_batches=1, max_tokens_per_micro_batch=BUDGET
        )
        resumed.load_state_dict(states[0])
        assert [key(b) for b in resumed] == full[stop:]
        # 2 ranks with a budget → 1 rank without: nothing skipped or repeated.
        seen = [
            o
            for r in range(2)
            for b in run(
                make(result, train, rank=r, world_size=2, micro_batches=1, max_tokens_per_micro_batch=BUDGET)[
                    0
                ],
                stop,
            )
            for o in b.occurrences
        ]
        single, _ = make(result, train, rank=0, world_size=1, micro_batches=2)
        single.load_state_dict(states[0])
        seen += [o for b in single for o in b.occurrences]
        assert sorted(seen) == list(range(single.occurrences_per_epoch))


# ---------------------------------------------------------------------------------------------- prefetch


def test_prefetch_reads_ahead_in_a_thread_and_changes_nothing(mixture):
    result, train, _ = mixture
    threads = []

    class Recording(Reader):
        def __call__(self, sample_ids):
            threads.append(threading.current_thread())
            return super().__call__(sample_ids)

    def loader(prefetch):
        return MixtureLoader(
            result.mixture, result.mixture_id, rank=1, world_size=2, max_length=MAX_LENGTH,
            micro_batches_per_step=3, seed=0, sample_reader=Recording(train), window_size=WINDOW,
            num_epochs=2, prefetch=prefetch,
        )  # fmt: skip

    inline = [(key(b), b.payloads) for b in loader(0)]
    assert set(threads) == {threading.main_thread()}
    threads.clear()
    ahead = loader(3)
    got = []
    for b in ahead:
        got.append((key(b), b.payloads))
    assert [k for k, _ in got] == [k for k, _ in inline]
    assert all(
        [p["sample_id"] for pack in x for p in pack] == [p["sample_id"] for pack in y for p in pack]
        for (_, x), (_, y) in zip(got, inline)
    )
    assert threading.main_thread() not in threads  # the reads ran in the loader's thread

    # Stopping early: the state counts only what was taken (not what was read ahead), the thread ends.
    before = threading.active_count()
    early = loader(4)
    it = iter(early)
    taken = [next(it) for _ in range(4)]
    time.sleep(0.2)  # let the thread fill its queue
    assert early.state_dict()["micro_batches_done"] == 1 and early.state_dict()["window"] == 1
    assert threading.active_count() == before + 1
    it.close()
    assert threading.active_count() == before
    resumed = loader(2)
    resumed.load_state_dict(early.state_dict())
    assert [key(b) for b in taken] + [key(b) for b in resumed] == [k for k, _ in inline]


def test_a_read_error_is_raised_in_the_training_thread_naming_the_samples(mixture):
    result, train, _ = mixture
    failing = "image-001"

    class Failing(Reader):
        def __call__(self, sample_ids):
            if failing in sample_ids:
                raise KeyError(f"no rows [{failing!r}]")
            return super().__call__(sample_ids)

    loader = MixtureLoader(
        result.mixture, result.mixture_id, rank=0, world_size=1, max_length=MAX_LENGTH,
        micro_batches_per_step=2, seed=0, sample_reader=Failing(train), window_size=WINDOW, prefetch=2,
    )  # fmt: skip
    before = threading.active_count()
    with pytest.raises(KeyError, match="no rows") as raised:
        for _ in loader:
            pass
    note = "\n".join(raised.value.__notes__)
    assert "reading step" in note and repr(failing) in note
    assert threading.active_count() == before  # the reading thread has ended
