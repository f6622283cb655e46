"""The tokenizer: the special tokens of the Keye-VL-1.5 token stream, the project's own small BPE, and
loading.

Two kinds of tokenizer are used:
- the default one, shipped in `assets/tokenizer/`: a byte-level BPE (vocab 4096) trained with the `tokenizers`
  library on `assets/corpus.txt`, a small English corpus written for this project. It lets the tiny CPU
  recipe and the tests run with no model hub. `scripts/build_tokenizer.py` rebuilds it; training is
  deterministic, and a test checks the shipped files equal a fresh build.
- a real checkpoint's tokenizer (Keye-VL-1.5 / Qwen3, vocab 151936) from a local directory.

Both are `transformers` fast tokenizers that never append BOS/EOS on their own: `ByT5Tokenizer` always adds
`</s>` (STACK.md), which would silently put an end-of-sequence token inside every timestamp and text span.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

ASSETS_DIR = Path(__file__).parent / "assets"
CORPUS_PATH = ASSETS_DIR / "corpus.txt"
SHIPPED_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
VOCAB_SIZE = 4096

# Chat roles and text framing (Qwen style).
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# The vision token stream (SPEC §2; layout in token_stream.py).
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD, FRAME = "<|image_pad|>", "<|video_pad|>", "<|frame|>"
FAST_START, FAST_END = "<|fast_start|>", "<|fast_end|>"
# Grounding (SPEC §3) and the thinking-mode output format (SPEC §4).
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
POINT_START, POINT_END = "<|point_start|>", "<|point_end|>"
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
CLIP_TIME_START, CLIP_TIME_END = "<|clip_time_start|>", "<|clip_time_end|>"
THINK_START, THINK_END, ANSWER_START, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"

# Every token here encodes to exactly one id and is never split or merged with its neighbours.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END,
    VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, FRAME, FAST_START, FAST_END,
    BOX_START, BOX_END, POINT_START, POINT_END, OBJECT_REF_START, OBJECT_REF_END,
    CLIP_TIME_START, CLIP_TIME_END,
    THINK_START, THINK_END, ANSWER_START, ANSWER_END,
)  # fmt: skip
# The tokens a vision-language model cannot run without; a checkpoint's tokenizer must have all of them.
VISION_TOKENS: tuple[str, ...] = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, FRAME, FAST_START, FAST_END)
# Markup the model writes as part of its answer: kept by `decode(..., skip_special_tokens=True)` so that
# graders and reward functions see `<think>…</think><answer>…</answer>` and boxes (Qwen3 does the same for
# `<think>`). The other special tokens are dropped by such a decode.
MARKUP_TOKENS: tuple[str, ...] = (
    BOX_START, BOX_END, POINT_START, POINT_END, OBJECT_REF_START, OBJECT_REF_END,
    CLIP_TIME_START, CLIP_TIME_END, THINK_START, THINK_END, ANSWER_START, ANSWER_END,
)  # fmt: skip

# The system prompt Keye's chat template writes when a conversation does not start with a system message.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Keye-VL's chat template, kept equal to what `token_stream.render_conversation` builds (a test checks it).
# Written from the template the Keye processor ships (Kwai-Keye/Keye `keye-vl-8b-preview/
# chat_template.json`, the Qwen2-VL template; transformers' Keye docs show the same output): a default system
# turn when the first message is not a system one, then `<|im_start|>{role}\n{content}<|im_end|>\n` per
# message, media parts as one placeholder inside vision_start/end (the processor expands it to the full token
# stream), adjacent text parts joined as they are. Thinking modes are chosen by the user typing `/think` or
# `/no_think` at the end of the question (the Keye-VL-1.5 model card); the template leaves that text as typed
# and adds nothing to the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n' + '" + DEFAULT_SYSTEM_PROMPT + "' + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Pre-tokenisation split used by Qwen2/Qwen3's tokenizer.json: contractions, letter runs with one leading
# non-letter, each digit on its own (so "12.5" is "1" "2" "." "5" and every number tokenises the same way
# whatever the vocabulary learnt), punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def build_tokenizer(
    corpus_path: str | Path = CORPUS_PATH, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train the default byte-level BPE on `corpus_path` and wrap it. Deterministic for a given corpus.

    The BPE learns `vocab_size - len(SPECIAL_TOKENS)` entries (256 bytes + merges); the special tokens take
    the last ids, in SPECIAL_TOKENS order, as in Qwen's vocabulary.
    """
    num_learned = vocab_size - len(SPECIAL_TOKENS)
    if num_learned <= 256:
        raise ValueError(
            f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}"
        )
    lines = [line for line in Path(corpus_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"tokenizer corpus {corpus_path} is empty")

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer)
    # One token at a time so ids follow SPECIAL_TOKENS order. normalized=False: matched on the raw text.
    for token in SPECIAL_TOKENS:
        added = AddedToken(token, special=token not in MARKUP_TOKENS, normalized=False)
        if token in MARKUP_TOKENS:
            bpe.add_tokens([added])
        else:
            bpe.add_special_tokens([added])

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        add_eos_token=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> list[Path]:
    """Write `tokenizer` to `out_dir`, replacing what was there (no stale files from an older layout)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(staged)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return sorted(out_dir.iterdir())


def missing_vision_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The VISION_TOKENS that `tokenizer` does not encode as one id of their own."""
    missing = []
    for token in VISION_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] != tokenizer.convert_tokens_to_ids(token):
            missing.append(token)
    return missing


@functools.lru_cache(maxsize=1)
def _shipped_tokenizer() -> PreTrainedTokenizerFast:
    if not (SHIPPED_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"shipped tokenizer missing under {SHIPPED_TOKENIZER_DIR}; "
            "run `python scripts/build_tokenizer.py`"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(SHIPPED_TOKENIZER_DIR))


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The shipped tokenizer (`path=None`, one shared cached instance: do not mutate it), or the tokenizer
    saved in a local directory (a Keye-VL-1.5 / Qwen checkpoint), checked to have every vision token."""
    if path is None:
        return _shipped_tokenizer()
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} is not a local directory (no model hub is used)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = missing_vision_tokens(tokenizer)
    if missing:
        raise ValueError(
            f"tokenizer at {path} lacks vision tokens as single ids: {', '.join(missing)}; "
            "a Keye-VL-1.5 tokenizer has all of " + ", ".join(VISION_TOKENS)
        )
    return tokenizer


def tokenizer_version(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of everything that decides token ids: vocabulary, merges, added/special tokens,
    normaliser and pre-tokeniser, and the named special tokens. Put it in config hashes, so a changed
    tokenizer re-counts tokens. Padding/truncation settings are left out (they change at call time)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items())}
    named = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"backend": state, "special_tokens": named}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def checkpoint_tokenizer(checkpoint: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a checkpoint directory carries (`tokenizer.json` or `tokenizer_config.json`), else the
    shipped one: our stage checkpoints save only the model, a Keye-VL-1.5 checkpoint its own tokenizer."""
    path = Path(checkpoint)
    has_own = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return load_tokenizer(path if has_own else None)
