"""Evaluation of a checkpoint, and the gate that decides whether a child checkpoint may replace its parent.

Three parts, each usable alone (no Prefect, no MLflow here):

1. `heldout_loss`: the mean next-token loss per modality over held-out `train_samples` (read through a
   `LanceSampleReader` or any `sample_ids -> list[Features]` callable). Token-weighted: every trained token of
   every sample of a modality counts once (Σ token losses / Σ trained tokens), the same per-token loss the
   training loop minimises, so a long video sample weighs more than a short one.
2. Multiple-choice video QA in the Video-MME record format
   `{"video": path_or_media_id, "question": str, "options": ["A. ...", "B. ...", ...], "answer": "C"}`,
   scored by option likelihood (no generation, no answer parsing): for each option the conversation
   user: [video, question + "\\n" + the options one per line] → assistant: the option text (e.g. "C. 3") is
   encoded with the processor and the log-probabilities of the assistant tokens (the option text and its
   closing `<|im_end|>`, exactly the tokens SFT trains) are summed. The prediction is the option with the
   highest **mean** log-probability per assistant token (length-normalised): options differ in token count
   ("A. 9" vs "B. 12" — digits are single tokens), and a summed score would favour the shortest option for
   that reason alone. The summed score is reported beside it. Ties go to the earlier option.
   `generate_mcq_set` builds such a set from pre-tokenised `video_samples` rows, with questions whose answers
   follow from the table's facts (Slow/Fast frame counts, sampled frames, duration, orientation), so the
   tiny pipeline has a real video eval set whose answers are visible in the token stream itself.
3. `promotion_gate`: fails when a held-out loss is worse than the parent's by more than `margin` (relative)
   or an MCQ accuracy drops by more than `margin` (absolute), with one reason per failing metric.

`distributed_heldout_loss` and `distributed_mcq` are the first two over the ranks of a job
(`keyeflow.steps.eval_job`): each rank takes its `rank_share` of the samples and records, and the ranks
combine to what one process computes (loss sums and token counts summed, option scores gathered in order).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from keyeflow.datasets import tables
from keyeflow.datasets.sample_reader import read_media
from keyeflow.model.processor import Features, MediaPatches, collate, collate_rows, encode_sample
from keyeflow.model.token_stream import FAST, SLOW
from keyeflow.training import distributed
from keyeflow.training.preference import sequence_logprobs

SampleReader = Callable[[list[str]], list[Features]]
MediaResolver = Callable[[str], MediaPatches]
READ_CHUNK = 64  # samples read from the reader per call: bounds memory, amortises the Lance query


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def heldout_loss_sums(
    model: torch.nn.Module,
    reader: SampleReader,
    sample_ids_by_modality: Mapping[str, Sequence[str]],
    max_length: int,
    *,
    pad_token_id: int = 0,
) -> dict[str, tuple[float, int]]:
    """Per modality, (Σ cross-entropy over trained tokens, their number), as `heldout_loss` computes them
    (the caller sets eval mode). A modality with no samples gives (0.0, 0): a rank's share may be empty."""
    device = _device(model)
    out: dict[str, tuple[float, int]] = {}
    for modality, ids in sample_ids_by_modality.items():
        ids = list(ids)
        total, count = 0.0, 0
        row: list[Features] = []

        def run(row: list[Features]) -> None:
            nonlocal total, count
            batch = _to(collate_rows([row], pad_token_id=pad_token_id), device)
            logp, n = sequence_logprobs(model, batch)
            total -= float(logp.sum(dtype=torch.float64))
            count += int(n.sum())

        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            for sample_id, features in zip(chunk, reader(chunk)):
                if len(features) > max_length:
                    raise ValueError(
                        f"held-out sample {sample_id!r} has {len(features)} tokens, more than "
                        f"max_length={max_length}"
                    )
                if row and sum(len(f) for f in row) + len(features) > max_length:
                    run(row)
                    row = []
                row.append(features)
        if row:
            run(row)
        out[modality] = (total, count)
    return out


def _check_heldout(sample_ids_by_modality: Mapping[str, Sequence[str]], max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for modality, ids in sample_ids_by_modality.items():
        if not len(ids):
            raise ValueError(f"no held-out samples for modality {modality!r}")


def _mean_losses(sums: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    out = {}
    for modality, (total, count) in sums.items():
        if count == 0:
            raise ValueError(f"held-out samples of modality {modality!r} have no trained tokens")
        out[modality] = total / count
    return out


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    reader: SampleReader,
    sample_ids_by_modality: Mapping[str, Sequence[str]],
    max_length: int,
    *,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """Mean token loss per modality (Σ cross-entropy over trained tokens / their number), in eval mode with
    no grad (the model's mode is restored after). Samples are packed in the given order into rows of at most
    `max_length` tokens (attention stays inside each sample, so packing does not change any sample's loss)
    and run one row at a time; a sample longer than `max_length` is an error, as in training (cutting it
    could separate vision tokens from their patches)."""
    _check_heldout(sample_ids_by_modality, max_length)
    was_training = model.training
    model.eval()
    try:
        sums = heldout_loss_sums(model, reader, sample_ids_by_modality, max_length, pad_token_id=pad_token_id)
    finally:
        model.train(was_training)
    return _mean_losses(sums)


# ---------------------------------------------------------------------------------------------- MCQ


def option_letter(option: str) -> str:
    """The letter of an option: 'C' for 'C. three' (Video-MME options start with a letter and a full stop)."""
    letter, dot, _ = option.partition(".")
    letter = letter.strip()
    if not dot or len(letter) != 1 or not letter.isalpha() or not letter.isupper():
        raise ValueError(
            f"an option must start with its capital letter and '.', e.g. 'A. ...', got {option!r}"
        )
    return letter


def check_mcq_record(record: Mapping) -> list[str]:
    """The letters of a record's options, after checking the record has the Video-MME fields."""
    missing = [k for k in ("video", "question", "options", "answer") if k not in record]
    if missing:
        raise ValueError(f"MCQ record lacks {missing}: {dict(record)}")
    options = record["options"]
    if isinstance(options, str) or len(options) < 2:
        raise ValueError(f"an MCQ record needs a list of at least 2 options, got {options!r}")
    letters = [option_letter(o) for o in options]
    if len(set(letters)) != len(letters):
        raise ValueError(f"option letters repeat: {letters}")
    if record["answer"] not in letters:
        raise ValueError(f"answer {record['answer']!r} is not one of the option letters {letters}")
    return letters


def mcq_prompt(record: Mapping) -> str:
    """The user text after the video: the question, then each option on its own line."""
    return record["question"] + "\n" + "\n".join(record["options"])


def option_conversation(record: Mapping, option: str) -> list[dict]:
    """The conversation scored for one option: user [video, question + options], assistant the option."""
    return [
        {"role": "user", "content": [
            {"type": "video", "video": record["video"]},
            {"type": "text", "text": mcq_prompt(record)},
        ]},
        {"role": "assistant", "content": option},
    ]  # fmt: skip


@dataclass(frozen=True)
class OptionScore:
    letter: str
    sum_logprob: float  # Σ log p over the assistant tokens (option text + <|im_end|>)
    num_tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / self.num_tokens


@dataclass(frozen=True)
class MCQResult:
    accuracy: float
    num_correct: int
    num_questions: int
    predictions: list[str]  # predicted letter per record, in order
    scores: list[list[OptionScore]]  # per record, per option


@torch.no_grad()
def score_options(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    record: Mapping,
    media: MediaPatches,
    *,
    spatial_merge_size: int = 2,
) -> list[OptionScore]:
    """Log-probability of every option of one record as the assistant's answer (one forward, a row per
    option; the caller sets eval mode). The video's patches go through the ViT once per option row."""
    letters = check_mcq_record(record)
    features = [
        encode_sample(option_conversation(record, option), tokenizer, lambda part: media,
                      spatial_merge_size=spatial_merge_size)
        for option in record["options"]
    ]  # fmt: skip
    batch = _to(collate(features, pack=False, pad_token_id=tokenizer.pad_token_id or 0), _device(model))
    logp, counts = sequence_logprobs(model, batch)
    return [OptionScore(L, float(s), int(n)) for L, s, n in zip(letters, logp.tolist(), counts.tolist())]


def predict(scores: Sequence[OptionScore], length_normalized: bool = True) -> str:
    """The letter of the best option: highest mean log-prob per token (or sum); ties → earlier option."""
    key = (lambda s: s.mean_logprob) if length_normalized else (lambda s: s.sum_logprob)
    best = scores[0]
    for s in scores[1:]:
        if key(s) > key(best):
            best = s
    return best.letter


def mcq_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions equal to the answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def mcq_result(
    records: Sequence[Mapping], scores: Sequence[list[OptionScore]], length_normalized: bool = True
) -> MCQResult:
    """Predictions and accuracy from every record's option scores (in the records' order)."""
    predictions = [predict(s, length_normalized) for s in scores]
    answers = [r["answer"] for r in records]
    accuracy = mcq_accuracy(predictions, answers)
    num_correct = sum(p == a for p, a in zip(predictions, answers))
    return MCQResult(accuracy, num_correct, len(records), predictions, list(scores))


def _score_records(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping],
    resolve_media: MediaResolver,
    spatial_merge_size: int,
) -> list[list[OptionScore]]:
    was_training = model.training
    model.eval()
    try:
        return [
            score_options(
                model, tokenizer, r, resolve_media(r["video"]), spatial_merge_size=spatial_merge_size
            )
            for r in records
        ]
    finally:
        model.train(was_training)


def evaluate_mcq(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping],
    resolve_media: MediaResolver,
    *,
    length_normalized: bool = True,
    spatial_merge_size: int = 2,
) -> MCQResult:
    """Accuracy of `model` on Video-MME-format `records`; `resolve_media(record["video"])` gives the video's
    pre-tokenised patches (`lance_video_lookup` for videos in the tables)."""
    for record in records:
        check_mcq_record(record)  # fail on a malformed set before spending any compute
    scores = _score_records(model, tokenizer, records, resolve_media, spatial_merge_size)
    return mcq_result(records, scores, length_normalized)


# ---------------------------------------------------------------------------------------------- across ranks


def rank_share(items: Sequence, rank: int, world_size: int) -> list:
    """The items a rank evaluates: every `world_size`-th from `rank` (the shares differ in length by at most
    one and interleave back into the original order)."""
    return list(items[rank::world_size])


def distributed_heldout_loss(
    model: torch.nn.Module,
    reader: SampleReader,
    sample_ids_by_modality: Mapping[str, Sequence[str]],
    max_length: int,
    info: distributed.Distributed,
    *,
    pad_token_id: int = 0,
) -> dict[str, float]:
    """`heldout_loss` over all ranks of `info`'s job, each rank running its `rank_share` of every modality's
    samples: the loss sums and token counts are summed over ranks (float64; counts are exact there), so the
    result is the same token-weighted mean (up to float rounding of the rows, which pack differently), on
    every rank."""
    _check_heldout(sample_ids_by_modality, max_length)
    share = {
        m: rank_share(list(ids), info.rank, info.world_size) for m, ids in sample_ids_by_modality.items()
    }
    was_training = model.training
    model.eval()
    try:
        local = heldout_loss_sums(model, reader, share, max_length, pad_token_id=pad_token_id)
    finally:
        model.train(was_training)
    modalities = list(sample_ids_by_modality)
    sums = torch.tensor(
        [[local[m][0], float(local[m][1])] for m in modalities], dtype=torch.float64, device=info.device
    )
    distributed.all_reduce_sum(info, sums)
    return _mean_losses({m: (float(s), int(n)) for m, (s, n) in zip(modalities, sums.tolist())})


def distributed_mcq(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping],
    resolve_media: MediaResolver,
    info: distributed.Distributed,
    *,
    length_normalized: bool = True,
    spatial_merge_size: int = 2,
) -> MCQResult:
    """`evaluate_mcq` over all ranks of `info`'s job: each rank scores its `rank_share` of the records (a
    record's scores do not depend on the others), the scores are gathered back into the records' order, and
    every rank gets the same result as one process would."""
    for record in records:
        check_mcq_record(record)
    local = _score_records(
        model, tokenizer, rank_share(records, info.rank, info.world_size), resolve_media, spatial_merge_size
    )
    shares = distributed.all_gather_objects(info, local)
    scores: list[list[OptionScore]] = [None] * len(records)  # type: ignore[list-item]
    for rank, share in enumerate(shares):
        scores[rank :: info.world_size] = share
    return mcq_result(records, scores, length_normalized)


def lance_video_lookup(root: str | None = None) -> MediaResolver:
    """A resolver from a `video_samples.sample_id` (or a video URI with exactly one sample) to its stored
    patches: the frames of `video_frames` in order, one (1, h, w) grid each, as the training reader builds
    them."""
    samples = tables.open_table("video_samples", root=root)

    def resolve(ref: str) -> MediaPatches:
        rows = samples.to_table(columns=["sample_id"], filter=pc.field("sample_id") == ref).to_pylist()
        if not rows:
            rows = samples.to_table(columns=["sample_id"], filter=pc.field("uri") == ref).to_pylist()
        if len(rows) != 1:
            raise KeyError(
                f"{ref!r} names {len(rows)} video samples; give a video_samples.sample_id"
                + (f" (one of {[r['sample_id'] for r in rows]})" if rows else "")
            )
        sample_id = rows[0]["sample_id"]
        return read_media({sample_id}, root)[sample_id]

    return resolve


# ---------------------------------------------------------------------------------------------- MCQ set


def _duration_s(row: Mapping) -> float:
    # The source duration when the row carries it (joined from `videos`), else what the sampling covered:
    # frames at 0, 1/fps, 2/fps, … cover num_frames / fps seconds.
    if row.get("duration_s") is not None:
        return float(row["duration_s"])
    return row["num_frames"] / row["sampling_fps"]


def _orientation(row: Mapping) -> str:
    h, w = row["slow_height"], row["slow_width"]
    return "landscape" if w > h else "portrait" if h > w else "square"


# name → (question, answer from a video_samples row, unit, smallest valid value); None unit = categorical
_QUESTIONS: dict[str, tuple[Callable[[Mapping], str], Callable[[Mapping], int | str], str, int]] = {
    "slow_frames": (
        lambda r: "How many scene cuts (Slow frames) does the video have, counting its first frame?",
        lambda r: sum(1 for t in r["frame_types"] if t == SLOW), "", 1,
    ),
    "duration": (
        lambda r: "How long is the video, to the nearest second?",
        lambda r: max(1, math.floor(_duration_s(r) + 0.5)), " seconds", 1,
    ),
    "fast_frames": (
        lambda r: "How many Fast frames (frames close to the Slow frame before them) does the video have?",
        lambda r: sum(1 for t in r["frame_types"] if t == FAST), "", 0,
    ),
    "sampled_frames": (
        lambda r: f"How many frames were sampled from the video at {r['sampling_fps']:g} frames per second?",
        lambda r: len(r["frame_types"]), "", 1,
    ),
    "orientation": (
        lambda r: "Is the video landscape, portrait or square?",
        _orientation, None, 0,
    ),
}  # fmt: skip
ORIENTATIONS = ("landscape", "portrait", "square")


def _rng(seed: int, *keys: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, (seed, *keys))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _choices(answer: int | str, unit: str | None, low: int, rng: random.Random) -> list[str]:
    if unit is None:  # categorical: every category is an option, in a fixed order
        return list(ORIENTATIONS)
    pool = [v for v in range(answer - 3, answer + 4) if v != answer and v >= low]
    values = [answer, *rng.sample(pool, 3)]
    rng.shuffle(values)
    return [f"{v}{unit}" for v in values]


def generate_mcq_set(video_samples_rows: Sequence[Mapping], n: int, *, seed: int = 0) -> list[dict]:
    """`n` Video-MME-format records about the given `video_samples` rows (dicts with sample_id, frame_types,
    sampling_fps, num_frames, slow_height, slow_width; `duration_s` is used when present). Question kinds
    (`task_type`): slow_frames, duration, fast_frames, sampled_frames, orientation; each answer is computed
    from the row, numeric ones get 3 distractors within ±3 of it, placed at a seeded random letter. Records
    cycle videos first, then kinds, so n <= len(rows) gives every video one question and no (video, kind)
    pair repeats. `video` is the sample id (resolve it with `lance_video_lookup`). Deterministic in
    (rows, n, seed)."""
    rows = sorted(video_samples_rows, key=lambda r: r["sample_id"])
    kinds = list(_QUESTIONS)
    if not rows:
        raise ValueError("generate_mcq_set needs at least one video_samples row")
    if not 1 <= n <= len(rows) * len(kinds):
        raise ValueError(f"n must be in [1, {len(rows) * len(kinds)}] ({len(rows)} videos × {len(kinds)} "
                         f"question kinds), got {n}")  # fmt: skip
    records = []
    for i in range(n):
        row, kind = rows[i % len(rows)], kinds[i // len(rows)]
        question, answer_of, unit, low = _QUESTIONS[kind]
        answer = answer_of(row)
        choices = _choices(answer, unit, low, _rng(seed, row["sample_id"], kind))
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        correct = letters[choices.index(answer if unit is None else f"{answer}{unit}")]
        records.append({
            "question_id": f"{row['sample_id']}/{kind}", "video": row["sample_id"], "task_type": kind,
            "question": question(row), "options": [f"{L}. {c}" for L, c in zip(letters, choices)],
            "answer": correct,
        })  # fmt: skip
    return records


# ---------------------------------------------------------------------------------------------- gate


def _flat(metrics: Mapping, section: str) -> dict[str, float]:
    value = metrics.get(section)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {f"{section}/{k}": float(v) for k, v in value.items()}
    return {section: float(value)}


def promotion_gate(
    child_metrics: Mapping, parent_metrics: Mapping, margin: float, accuracy_margin: float | None = None
) -> tuple[bool, list[str]]:
    """Whether a child checkpoint may be promoted over its parent, and a reason per failing metric.

    Metrics: `{"heldout_loss": {modality: loss}, "mcq_accuracy": accuracy or {benchmark: accuracy},
    "lmms_eval": {task/metric: score}}` (any section may be absent; lmms-eval scores are higher-is-better
    ones, compared like accuracies). A loss fails when child > parent · (1 + margin) (relative); an accuracy
    fails when child < parent − accuracy_margin (absolute; default: `margin`). A metric the parent has and the
    child lacks, or a non-finite child value, fails; metrics only the child has are not compared."""
    accuracy_margin = margin if accuracy_margin is None else accuracy_margin
    for name, value in (("margin", margin), ("accuracy_margin", accuracy_margin)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    reasons = []
    for section, lower_is_better in (("heldout_loss", True), ("mcq_accuracy", False), ("lmms_eval", False)):
        child, parent = _flat(child_metrics, section), _flat(parent_metrics, section)
        for name, before in parent.items():
            after = child.get(name)
            if after is None:
                reasons.append(f"{name}: missing from the child's metrics (parent {before:.4f})")
            elif not math.isfinite(after):
                reasons.append(f"{name}: child value {after} is not finite")
            elif lower_is_better and after > before * (1 + margin):
                change = (after - before) / before if before else math.inf
                reasons.append(
                    f"{name}: {after:.4f} vs parent {before:.4f} ({change:+.2%}), worse than the allowed "
                    f"+{margin:.2%}"
                )
            elif not lower_is_better and after < before - accuracy_margin:
                reasons.append(
                    f"{name}: {after:.4f} vs parent {before:.4f} ({after - before:+.4f}), a drop larger than "
                    f"the allowed {accuracy_margin:.4f}"
                )
    return not reasons, reasons
