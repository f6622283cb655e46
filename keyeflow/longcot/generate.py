"""LongCoT step 2 (SPEC §4.3.1): multi-path generation.

:func:`generate_paths` samples ``n`` paths per question from a :class:`~keyeflow.model.generation.Generator`
(our model in process, or any OpenAI-compatible server), computes each path's step and response confidence
from the token logprobs (``longcot_scoring.path_confidence``), its answer-level verdict (:func:`check_answer`:
``graders.answers_equivalent``, IoU ≥ 0.5 for grounding) and keeps diverse correct paths, most confident first
(``longcot_scoring.select_paths``). Wrong answers are graded C here. Table ``longcot_paths``: every path, kept
or dropped with its reason.

Also here, since every step that asks a model or shows a question uses them: the generation settings
(:class:`GenerationConfig`), the prompt (:func:`user_content`, :func:`generation_messages`), the lookup that
resolves a prompt's images and videos to their pre-tokenised patches (:class:`StoredMediaLookup`), and
:func:`make_generator` (our tiny random model by default, :func:`ensure_tiny_model`).
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import torch

from keyeflow.config import config_hash as hash_config
from keyeflow.config import get_settings
from keyeflow.datasets import images, pretokenize, tables
from keyeflow.datasets.images import ImageConfig
from keyeflow.datasets.sample_reader import read_media
from keyeflow.datasets.slowfast import resolve_config
from keyeflow.datasets.video import content_hash
from keyeflow.faults import kill_point
from keyeflow.longcot.common import DEFAULT_SCORING, chunks, read_ref_rows
from keyeflow.model.config import tiny
from keyeflow.model.generation import BatchGenerationError, LocalGenerator, OpenAICompatibleGenerator
from keyeflow.model.modeling import KeyeForConditionalGeneration
from keyeflow.model.processor import MediaPatches
from keyeflow.model.tokenizer import load_tokenizer
from keyeflow.quality import graders
from keyeflow.quality.errors import (
    DEFAULT_MAX_ERROR_SHARE,
    ErrorShareExceeded,
    check_error_share,
    check_max_error_share,
)
from keyeflow.quality.longcot_scoring import LongCoTConfig, ReasoningPath, path_confidence, select_paths

STAGE_GENERATE = "longcot_generate"
BACKENDS = ("local", "openai")
DEFAULT_SYSTEM_PROMPT = (
    "Think step by step inside <think></think>, one step per paragraph (separate steps with a blank line), "
    "then give only the final answer inside <answer></answer>."
)


@dataclass(frozen=True)
class GenerationConfig:
    """Step 2: where paths come from and how they are sampled.

    ``backend="local"``: our model in this process (``model_path``; None = the tiny random checkpoint made
    under ``KEYEFLOW_HOME/models/tiny-random``), images and videos looked up pre-tokenised
    (``max_image_tokens``; videos with ``video_preset`` and a ``max_video_tokens`` budget).
    ``backend="openai"``: an OpenAI-compatible server (``base_url`` with ``/v1``, ``model``; key from the
    environment variable ``api_key_env``), images sent as data URLs and videos as ``file://`` URLs
    (vLLM: ``--allowed-local-media-path``).
    """

    backend: str = "local"
    model_path: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    n: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8  # questions per generate call (and per commit)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    think_suffix: str = " /think"  # appended to the question: Keye's switch to thinking mode
    max_image_tokens: int = 256
    video_preset: str = "paper"
    max_video_tokens: int = 1024
    request_timeout_s: float = 600.0  # per attempt; a request that takes longer counts as a failed attempt
    # Further attempts for a transient failure (timeout, refused connection, 408/429/5xx), 0.5 s · 2^k apart;
    # malformed output and other errors are not retried. A question still failing is quarantined.
    max_retries: int = 4
    # The step fails when more than this share of the questions it generated for failed (each is quarantined
    # and retried on the next run either way); see keyeflow.quality.errors.
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"GenerationConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("GenerationConfig: the openai backend needs base_url and model")
        for name in ("n", "max_new_tokens", "batch_size", "max_image_tokens", "max_video_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be an integer >= 1, got {value!r}")
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            raise ValueError(
                f"GenerationConfig.temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if not (isinstance(self.request_timeout_s, (int, float)) and self.request_timeout_s > 0):
            raise ValueError(
                f"GenerationConfig.request_timeout_s must be a number > 0, got {self.request_timeout_s!r}"
            )
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ValueError(
                f"GenerationConfig.max_retries must be an integer >= 0, got {self.max_retries!r}"
            )
        check_max_error_share("GenerationConfig", self.max_error_share)

    def resolved_model_path(self) -> str | None:
        if self.backend != "local":
            return None
        return str(Path(self.model_path).resolve()) if self.model_path else str(default_model_path())

    def config_hash(self) -> str:
        """What changes the completions (not batching, timeouts or the key's variable)."""
        payload = asdict(self)
        for name in (
            "api_key_env",
            "batch_size",
            "request_timeout_s",
            "max_retries",
            "max_error_share",
            "model_path",
        ):
            payload.pop(name)
        payload["model_path"] = self.resolved_model_path()
        return hash_config(payload)


# ===================================================================================== tiny model default


def default_model_path() -> Path:
    return get_settings().root / "models" / "tiny-random"


def ensure_tiny_model(path: str | Path | None = None) -> Path:
    """The project's tiny randomly initialised checkpoint (seed 0), saved once to ``path`` (default
    ``KEYEFLOW_HOME/models/tiny-random``) with the shipped tokenizer; an existing one is reused."""
    path = Path(path) if path else default_model_path()
    if (path / "config.json").is_file():
        return path
    tokenizer = load_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = KeyeForConditionalGeneration(tiny(tokenizer))
    staged = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        staged.rename(path)
    except OSError:  # another process saved it first: theirs is the same model
        shutil.rmtree(staged, ignore_errors=True)
    return path


# ============================================================================= prompts, media, generators


def user_content(question: dict, suffix: str) -> str | list[dict]:
    """The user turn as the conversation format has it: media parts (absolute paths) then the text."""
    media = json.loads(question["media"]) if isinstance(question["media"], str) else question["media"]
    text = question["question"] + suffix
    if not media:
        return text
    return [{"type": m["type"], m["type"]: m["path"]} for m in media] + [{"type": "text", "text": text}]


def _server_part(part: dict) -> dict:
    """An internal media part as an OpenAI-compatible server takes it."""
    path = Path(part[part["type"]])
    if part["type"] == "image":
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "video_url", "video_url": {"url": path.resolve().as_uri()}}


def generation_messages(question: dict, config: GenerationConfig) -> list[dict]:
    content = user_content(question, config.think_suffix)
    if config.backend == "openai" and isinstance(content, list):
        content = [p if p["type"] == "text" else _server_part(p) for p in content]
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    return [*system, {"role": "user", "content": content}]


class StoredMediaLookup:
    """Resolves an image/video part (an absolute path) to its pre-tokenised patches: content hash →
    ``image_samples``/``video_samples`` row for the given configs (what the flow ingests first).

    Patches read once are kept: a sample id names its content and config, so its patches never change, and
    evaluation and RL ask for the same few pictures over and over (every sample of a held-out item, every
    hint level of an RL item); a read opens the media tables each time (about a fifth of a short
    generation's time on the tiny model)."""

    def __init__(self, image_config, slowfast, root: str | None = None):
        self.image_config, self.slowfast, self.root = image_config, slowfast, root
        self._hashes: dict[str, str] = {}
        self._patches: dict[str, MediaPatches] = {}

    def __call__(self, part):
        kind = part["type"]
        path = str(part[kind])
        if path not in self._hashes:
            self._hashes[path] = content_hash(path)[0]
        digest = self._hashes[path]
        sample = (
            images.sample_id(digest, self.image_config)
            if kind == "image"
            else pretokenize.sample_id(digest, self.slowfast)
        )
        if sample in self._patches:
            return self._patches[sample]
        try:
            self._patches[sample] = read_media({sample}, self.root)[sample]
            return self._patches[sample]
        except KeyError as error:
            raise ValueError(
                f"{kind} {Path(path).name} has no pre-tokenised sample {sample} for this "
                f"config ({error}); ingest it first"
            ) from None


def media_configs(config: GenerationConfig):
    """The image and Slow-Fast configs the local backend reads media with."""
    return (
        ImageConfig(max_tokens=config.max_image_tokens),
        resolve_config(config.video_preset, total_token_budget=config.max_video_tokens),
    )


def make_generator(config: GenerationConfig, root: str | None = None):
    """The :class:`~keyeflow.model.generation.Generator` a generation config names."""
    if config.backend == "openai":
        return OpenAICompatibleGenerator(
            config.base_url,
            config.model,
            api_key_env=config.api_key_env,
            timeout=config.request_timeout_s,
            max_retries=config.max_retries,
        )
    path = config.model_path or ensure_tiny_model()
    return LocalGenerator(path, media_lookup=StoredMediaLookup(*media_configs(config), root=root))


# ====================================================================================== answer level


@dataclass(frozen=True)
class AnswerCheck:
    ok: bool
    answer: str
    method: str
    reason: str


def check_answer(domain: str, response: str, reference: str, iou_threshold: float = 0.5) -> AnswerCheck:
    """Answer-level verdict of a response: its final answer (graders.extract_answer) against the reference;
    grounding answers by box IoU ≥ ``iou_threshold`` when both sides hold a box."""
    answer = graders.extract_answer(response)
    if domain == "grounding":
        try:
            iou = graders.grounding_iou(answer, reference)
        except (ValueError, TypeError):
            pass
        else:
            ok = iou >= iou_threshold
            return AnswerCheck(ok, answer, "iou", f"IoU {iou:.2f} {'≥' if ok else '<'} {iou_threshold}")
    verdict = graders.answers_equivalent(answer, reference)
    return AnswerCheck(verdict.equal, answer, verdict.method, verdict.reason)


# ======================================================================================= generate


@dataclass
class GenerateReport:
    num_questions: int = 0
    num_generated: int = 0  # questions sampled now
    num_already_done: int = 0
    num_failed: int = 0
    num_paths: int = 0
    num_correct: int = 0
    num_selected: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)


def _confidence(completion, config: LongCoTConfig) -> tuple[float, list[float], str]:
    if not completion.token_logprobs:
        return 0.0, [], "no token logprobs: confidence 0"
    offsets = [
        (start, start + len(token)) for start, token in zip(completion.token_offsets, completion.tokens)
    ]
    try:
        conf = path_confidence(completion.text, completion.token_logprobs, offsets, config)
    except ValueError as error:
        return 0.0, [], f"confidence 0: {error}"
    return float(conf.response), [float(c) for c in conf.step_confidences], ""


def path_rows(question: dict, completions: Sequence, gen_hash: str, config: LongCoTConfig) -> list[dict]:
    """One ``longcot_paths`` row per completion: answer verdict, confidences, selection."""
    qid = question["question_id"]
    built = []
    for k, completion in enumerate(completions):
        check = check_answer(question["domain"], completion.text, question["reference"])
        confidence, steps, note = _confidence(completion, config)
        path = ReasoningPath(qid, completion.text, check.ok, confidence)
        built.append((path, completion, check, steps, note))
    selection = select_paths([b[0] for b in built], config)
    dropped = {id(p): why for p, why in selection.dropped}
    now = tables.now()
    rows = []
    for k, (path, completion, check, steps, note) in enumerate(built):
        row = empty_path_row()
        row.update({
            "path_id": f"{qid}/{gen_hash}/{k}", "question_id": qid, "domain": question["domain"],
            "gen_config_hash": gen_hash, "path_index": k, "text": completion.text,
            "finish_reason": completion.finish_reason, "num_tokens": len(completion.tokens),
            "answer": check.answer, "answer_ok": check.ok, "answer_method": check.method,
            "answer_reason": check.reason,
            "format_problem": graders.format_problem(completion.text, "think") or "",
            "confidence": path.confidence, "step_confidences": steps, "num_steps": len(steps),
            "confidence_note": note, "selected": id(path) not in dropped, "created_at": now,
            "updated_at": now,
        })  # fmt: skip
        if not check.ok:
            row.update(
                grade="C",
                needs_review=False,
                grade_reasons="answer wrong",
                status="dropped",
                stage="generate",
                reason=f"C: answer wrong ({check.reason})",
            )
        elif id(path) in dropped:
            row.update(status="dropped", stage="select", reason=dropped[id(path)])
        else:
            row.update(
                status="selected", stage="select", reason="selected: correct, diverse, most confident first"
            )
        rows.append(row)
    return rows


def empty_path_row() -> dict:
    return {name: None for name in tables.SCHEMAS["longcot_paths"].names}


def generate_paths(
    questions: tables.TableRef,
    question_ids: Sequence[str],
    generator,
    config: GenerationConfig,
    scoring: LongCoTConfig = DEFAULT_SCORING,
    root: str | None = None,
    on_item: Callable[[], None] | None = None,
) -> GenerateReport:
    """Sample ``config.n`` paths for every question not yet done with this config; one commit per batch.

    Failures are per question: a question whose generation fails (the server timed out or was unreachable
    after the generator's retries, answered malformed output or an error, a prompt too long, media not
    pre-tokenised or gone) is quarantined (stage ``longcot_generate``, the reason naming the question id and
    the problem) and the rest of its batch is kept. It has no paths, so the next run tries it again; when it
    succeeds, its quarantine row is removed (the table's earlier versions keep it), so the quarantine
    table says what is failing now. Questions done before are not generated again. After every batch is
    committed, the step raises ErrorShareExceeded when more than ``config.max_error_share`` of the
    questions it generated for failed (a broken teacher must stop the flow, not leave it a few questions).
    """
    gen_hash = config.config_hash()
    rows = {r["question_id"]: r for r in read_ref_rows(questions, "question_id", question_ids)}
    ordered = [rows[q] for q in dict.fromkeys(question_ids) if q in rows]
    done = set()
    if tables.exists("longcot_paths", root):
        ds = tables.open_table("longcot_paths", root=root)
        found = ds.to_table(
            columns=["question_id"],
            filter=pc.field("question_id").isin([q["question_id"] for q in ordered])
            & (pc.field("gen_config_hash") == gen_hash),
        )
        done = set(found.column("question_id").to_pylist())
    report = GenerateReport(num_questions=len(ordered), num_already_done=len(done & set(rows)))
    # A run that stopped between writing a question's paths and clearing its quarantine row repairs it here.
    clear_quarantine(STAGE_GENERATE, sorted(done & set(rows)), root, gen_hash)
    pending = [q for q in ordered if q["question_id"] not in done]
    for _ in range(len(ordered) - len(pending)):
        if on_item:
            on_item()
    args = {
        "n": config.n,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
        "logprobs": True,
    }
    for batch in chunks(pending, config.batch_size):
        results: list = [None] * len(batch)
        asked, messages = [], []
        for k, q in enumerate(batch):
            try:
                messages.append(generation_messages(q, config))
                asked.append(k)
            except OSError as error:  # an image sent to a server was moved or deleted since collection
                results[k] = error
        for k, result in zip(asked, generate_each(generator, messages, args)):
            results[k] = result
        new_rows, bad, generated = [], [], []
        for q, result in zip(batch, results):
            if isinstance(result, Exception):
                reason = f"question {q['question_id']}: generation failed: {type(result).__name__}: {result}"
                bad.append(
                    tables.quarantine_row(q["source_uri"], reason, STAGE_GENERATE, q["question_id"], gen_hash)
                )
                report.quarantined[q["source_uri"]] = reason
                report.num_failed += 1
                continue
            new_rows += path_rows(q, result, gen_hash, scoring)
            generated.append(q["question_id"])
            report.num_generated += 1
        kill_point("longcot_generate.before_commit")  # the batch generated; none of its rows written
        # update_rows, not upsert: a question that fails again keeps one row, with the latest reason.
        tables.update_rows("quarantine", bad, root)
        tables.upsert("longcot_paths", new_rows, root)
        kill_point("longcot_generate.paths_committed")  # paths written; stale quarantine rows not cleared
        clear_quarantine(STAGE_GENERATE, generated, root, gen_hash)
        kill_point("longcot_generate.batch_committed")  # the batch all written; later batches not generated
        report.num_paths += len(new_rows)
        report.num_correct += sum(r["answer_ok"] for r in new_rows)
        report.num_selected += sum(r["status"] == "selected" for r in new_rows)
        for _ in batch:
            if on_item:
                on_item()
    attempted = report.num_generated + report.num_failed
    if (
        report.num_failed
        and not (report.num_generated or report.num_already_done)
        and attempted
        and (report.num_failed / attempted > config.max_error_share)
    ):  # the threshold's error, in the words that say what happened: nothing has paths
        uri, reason = next(iter(report.quarantined.items()))
        raise ErrorShareExceeded(
            f"LongCoT generation: none of the {report.num_questions} questions got paths "
            f"({report.num_failed} "
            f"failed; first, {uri}: {reason}). Each is in the quarantine table (stage {STAGE_GENERATE}) "
            "and is tried again on the next run."
        )
    check_error_share(
        "LongCoT generation",
        list(report.quarantined.items()),
        report.num_generated + report.num_failed,
        config.max_error_share,
    )
    return report


_GENERATION_ERRORS = (RuntimeError, ValueError, OSError, KeyError)


def generate_each(generator, messages: list[list[dict]], args: dict) -> list:
    """Per conversation, its completions or the error it failed with.

    Our generators report a partial failure with ``BatchGenerationError`` and the good results are kept
    as they are; a generator that fails a whole batch at once is asked again one conversation at a time,
    so that one bad question does not sink the others.
    """
    if not messages:
        return []
    try:
        return generator.generate(messages, **args)
    except BatchGenerationError as error:
        return error.results
    except _GENERATION_ERRORS as error:
        if len(messages) == 1:
            return [error]
    out: list = []
    for m in messages:
        try:
            out.append(generator.generate([m], **args)[0])
        except _GENERATION_ERRORS as single:
            out.append(single)
    return out


def clear_quarantine(
    stage: str, content_hashes: Sequence[str], root: str | None, config_hash: str | None = None
) -> None:
    """Remove the failures of `stage` of the items (question or path ids) that have now succeeded (with
    these settings, when `config_hash` is given)."""
    if not content_hashes or not tables.exists("quarantine", root):
        return
    where = (pc.field("stage") == stage) & pc.field("content_hash").isin(list(content_hashes))
    if config_hash is not None:
        where &= pc.field("config_hash") == config_hash
    tables.delete_rows("quarantine", where, root)
