"""Still images: find, hash, check, decode and pre-tokenise them into ``images`` and ``image_samples``.

An image is cheap to decode, so ingestion and pre-tokenisation are one step here (videos split them
because decoding is the expensive part): each file is hashed, its header read, refused early if it cannot
become training data, then decoded once, turned upright and into RGB, resized with the processor's
``smart_resize`` to between ``min_tokens`` and ``max_tokens`` LLM tokens, and stored as uint8 14×14 patches
in exactly the layout of ``video_frames.patches`` (:func:`keyeflow.datasets.pretokenize.patchify`).

Identity and idempotence follow the video path: ``image_id`` is the sha256 of the file's bytes (the same
picture under two names is kept once, the second name quarantined as a duplicate), a sample is keyed by
``(image, config hash)``, and every commit is a keyed Lance insert of rows not already there, so a rerun
reads the headers again but writes nothing.

Order of the checks, cheapest and safest first (nothing is decoded before the header checks pass):

1. read and hash the bytes (unreadable path, empty file);
2. identify the format from the header only: JPEG (and its MPO variant), PNG, WEBP, BMP, GIF (text, other
   formats and unrecognisable bytes are refused with different reasons);
3. the size the header claims: more than ``max_header_pixels`` is refused without decoding (a
   decompression bomb: a few kB of PNG can claim 50,000×50,000 pixels, 7.5 GB as RGB); a side shorter than
   ``min_side`` carries nothing to learn; an aspect ratio over 200:1 is what the processor refuses;
4. ``verify()`` (PNG chunk CRCs and structure), then the full decode (truncated data fails here).

Decoding choices, each deliberate:

- **EXIF orientation** is applied (``ImageOps.exif_transpose``) so a phone photo is stored as it is
  shown; ``images.width/height`` are the displayed size and ``exif_orientation`` keeps the tag as found
  (0: no tag, 1: upright, 2-8: the EXIF transforms). keye-vl-utils 1.5.2 does not do this.
- **Transparency** (RGBA, LA, PA, a palette or RGB with a transparent colour) is composited **over
  white**, as qwen-vl-utils' ``to_rgb`` and vLLM's image loader do by default: transparent images are
  mostly logos, icons, diagrams and screenshots drawn for a white page, and over black their dark text and
  lines would vanish. keye-vl-utils 1.5.2 calls ``convert("RGB")``, which drops alpha and exposes whatever
  colour the transparent pixels happen to store (black for most encoders).
- **16-bit greyscale** (PNG ``I;16``) is scaled to 8 bits (``v * 255 / 65535``, rounded) instead of
  clipped, which would turn everything above 255 of 65535 white.
- **CMYK** JPEGs go through Pillow's conversion (Adobe-inverted CMYK is handled by the decoder); no ICC
  colour management anywhere.
- **Resizing** is Pillow bicubic on the RGB image, what keye-vl-utils' ``fetch_image`` does, so the stored
  pixels are the ones the released model was fed for a still image.
- **GIF** and animated **WEBP**: the first frame only. **BMP** is accepted too. All formats record
  their Pillow name (MPO, a JPEG carrying extra pictures, is recorded as JPEG).

Pillow's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``, process-wide: it warns above the limit
and raises above twice it) is raised to at least ``max_header_pixels`` so it never refuses what the
config allows, and both its warning and its error become a quarantine reason; our explicit header check
is the one that enforces the config. (The warning filter is process-wide as well: should concurrent
threads lose it, Pillow's warning merely prints and the header check still refuses the file.)
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from keyeflow.config import check_int, invalid
from keyeflow.config import config_hash as _hash_config
from keyeflow.datasets import tables
from keyeflow.datasets.ingest import IngestConfig, IngestReport
from keyeflow.datasets.pretokenize import patchify
from keyeflow.datasets.slowfast import smart_resize
from keyeflow.datasets.video import MAX_ASPECT_RATIO, BadVideo, as_local_file, content_hash, discover
from keyeflow.faults import kill_point

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "STAGE",
    "BadImage",
    "DecodedImage",
    "ImageConfig",
    "ImageIngestReport",
    "decode_image",
    "discover_images",
    "ingest_images_shard",
    "load_image_patches",
    "plan_image_shards",
    "sample_id",
    "tokenize_image",
]

STAGE = "ingest_images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # Pillow's names for what we accept
_ORIENTATION_TAG = 0x0112
_FLUSH_BYTES = 256 << 20  # commit sample rows at least this often: a shard of 20k-token images is large
_PIL_LIMIT_LOCK = threading.Lock()


class BadImage(ValueError):
    """An input that cannot become training data; ``reason`` says why in one line."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class ImageConfig:
    """Every setting that decides which images are taken and how many tokens each becomes."""

    min_tokens: int = 4  # LLM tokens (one per 28×28 area); keye-vl-utils' MIN_TOKENS
    max_tokens: int = 20_480  # keye-vl-utils 1.5.2's MAX_TOKENS (SPEC §1)
    patch_size: int = 14
    merge_size: int = 2
    min_side: int = 8  # pixels; a thinner image is blown up from almost nothing and carries nothing to learn
    # 128 MP: what a 100 MP medium-format photo or an 11k×11k scan needs, and 512 MiB decoded as RGBA, the
    # most one data worker should spend on one image. Larger headers are refused before decoding.
    max_header_pixels: int = 128 << 20

    def __post_init__(self) -> None:
        for name in ("min_tokens", "max_tokens", "patch_size", "merge_size", "min_side", "max_header_pixels"):
            object.__setattr__(self, name, check_int("ImageConfig", name, getattr(self, name), minimum=1))
        if self.max_tokens < self.min_tokens:
            raise invalid(
                "ImageConfig", "max_tokens", self.max_tokens, f"must be >= min_tokens ({self.min_tokens})"
            )
        if self.max_header_pixels < self.min_side * self.min_side:
            raise invalid(
                "ImageConfig",
                "max_header_pixels",
                self.max_header_pixels,
                f"must be >= min_side**2 ({self.min_side * self.min_side}), or no image could pass",
            )

    @property
    def factor(self) -> int:
        """Side in pixels of the area one LLM token covers (ViT patch × merge = 28)."""
        return self.patch_size * self.merge_size

    def config_hash(self) -> str:
        """Stable hash of every field: each one decides which rows exist or what their pixels are."""
        return _hash_config(self)


@dataclass
class ImageIngestReport(IngestReport):
    """What happened to each image of a shard; ``num_ingested`` counts samples written by this run."""

    total_tokens: int = 0

    def add(self, other: ImageIngestReport) -> ImageIngestReport:
        super().add(other)
        self.total_tokens += other.total_tokens
        return self


def sample_id(image_id: str, config: ImageConfig) -> str:
    return f"{image_id[:16]}-{config.config_hash()}"


def discover_images(paths: list[str]) -> list[str]:
    """Files, directories (recursive) and fsspec URIs/globs → sorted image URIs (missing paths kept)."""
    return discover(paths, IMAGE_SUFFIXES)


def plan_image_shards(paths: list[str], config: IngestConfig | None = None) -> list[list[str]]:
    """Discovered image URIs in shards of ``config.shard_size`` (the video ingestion's config)."""
    size = (config or IngestConfig()).shard_size
    uris = discover_images(paths)
    return [uris[i : i + size] for i in range(0, len(uris), size)]


def load_image_patches(sample_row: dict) -> np.ndarray:
    """An ``image_samples`` row's patches as a (grid_h·grid_w, 3·p·p) uint8 array, merge groups contiguous."""
    num_patches = sample_row["grid_h"] * sample_row["grid_w"]
    flat = np.frombuffer(sample_row["patches"], dtype=np.uint8)
    if num_patches <= 0 or flat.size % num_patches:
        raise ValueError(
            f"sample {sample_row.get('sample_id')}: {flat.size} bytes do not split into "
            f"{sample_row['grid_h']}x{sample_row['grid_w']} patches"
        )
    return flat.reshape(num_patches, flat.size // num_patches)


# ---------------------------------------------------------------------------------------------------------
# One image


@dataclass(frozen=True)
class DecodedImage:
    rgb: Image.Image  # mode RGB, upright (EXIF orientation applied), alpha composited over white
    format: str
    mode: str  # Pillow's mode as stored in the file (P, RGBA, I;16, CMYK, ...)
    exif_orientation: int  # 0 when the file has no orientation tag


def _allow_pil_pixels(limit: int) -> None:
    """Make Pillow's process-wide bomb check at least as permissive as ours (never lower it)."""
    with _PIL_LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
            Image.MAX_IMAGE_PIXELS = limit


def _refuse_truncated_files() -> None:
    """Turn Pillow's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` back off before a decode. Libraries set
    it on import (lmms-eval's ``lmms_eval.api.task`` does), and with it on a truncated file decodes with its
    missing rows filled grey and would enter training as a sample; ingestion quarantines truncated files.
    Code that shares the process and wants truncated files loaded must set it again itself."""
    with _PIL_LIMIT_LOCK:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _bomb_reason(exc: Exception, limit: int) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    claimed = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"possible decompression bomb: header claims {claimed} (limit {limit:,}); not decoded"


def _unidentified_reason(path: str, uri: str) -> str:
    """Why Pillow could not identify the file: plain text, another image format, or unknown bytes."""
    suffix = Path(uri).suffix or "(no suffix)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return f"not an image: the file holds plain text (named {suffix})"
    try:
        with Image.open(path) as other:  # any format Pillow knows, to name it
            fmt = other.format
    except Exception:  # noqa: BLE001 - anything means "not a known format"
        fmt = None
    if fmt:
        return f"unsupported image format {fmt} (accepted: {', '.join(FORMATS)})"
    return (
        f"corrupt or not an image: the bytes match no supported format ({', '.join(FORMATS)}); named {suffix}"
    )


def _open(path: str, uri: str, config: ImageConfig) -> Image.Image:
    """Open lazily (header only); Pillow's bomb warning and error become reasons."""
    try:
        # An MPO file (a JPEG carrying extra pictures) is opened by the JPEG factory as format "MPO".
        return Image.open(path, formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage(uri, _unidentified_reason(path, uri)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(uri, _bomb_reason(exc, config.max_header_pixels)) from exc
    except FileNotFoundError as exc:
        raise BadImage(uri, f"unreadable: file not found ({exc.strerror or exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
        # Plugins raise SyntaxError/ValueError/struct errors for a header they recognise but cannot parse.
        raise BadImage(uri, f"corrupt image header: {_detail(exc)}") from exc


def _detail(exc: Exception) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def _check_header(image: Image.Image, uri: str, config: ImageConfig) -> None:
    width, height = image.size
    if width * height > config.max_header_pixels:
        raise BadImage(
            uri,
            f"possible decompression bomb: header claims {width}x{height} = {width * height:,} pixels "
            f"(limit {config.max_header_pixels:,}); not decoded",
        )
    if min(width, height) < config.min_side:
        raise BadImage(
            uri, f"too small: {width}x{height} pixels (each side must be at least {config.min_side})"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise BadImage(
            uri, f"extreme aspect ratio {width}x{height} ({ratio:.0f}:1, limit {MAX_ASPECT_RATIO}:1)"
        )


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 0)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels are still fine, assume upright
        return 0
    return value if isinstance(value, int) else 0


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image from any mode the accepted formats decode to (see the module docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        grey = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image if mode == "RGB" else image.convert("RGB")


def decode_image(path: str, uri: str, config: ImageConfig) -> DecodedImage:
    """Header checks, verify, decode, orient and convert one local image file; raises BadImage."""
    _allow_pil_pixels(config.max_header_pixels)
    _refuse_truncated_files()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(path, uri, config) as image:
            fmt = "JPEG" if image.format == "MPO" else image.format
            mode = image.mode
            _check_header(image, uri, config)
            try:
                image.verify()
            except Exception as exc:  # verify raises whatever the plugin hits
                raise BadImage(uri, f"corrupt image: {_detail(exc)}") from exc
        # verify() leaves the object unusable; decode from a fresh open.
        with _open(path, uri, config) as image:
            try:
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise BadImage(uri, _bomb_reason(exc, config.max_header_pixels)) from exc
            except MemoryError as exc:
                raise BadImage(uri, "out of memory while decoding") from exc
            except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, ...
                raise BadImage(uri, f"corrupt or truncated image data: {_detail(exc)}") from exc
            orientation = _orientation(image)
            upright = ImageOps.exif_transpose(image) if orientation in range(2, 9) else image
            try:
                rgb = _to_rgb(upright)
                rgb.load()  # detach from the file before it closes
            except (ValueError, OSError) as exc:
                raise BadImage(
                    uri, f"cannot convert pixel mode {upright.mode} to RGB: {_detail(exc)}"
                ) from exc
    return DecodedImage(rgb=rgb, format=fmt, mode=mode, exif_orientation=orientation)


def tokenize_image(uri: str, image_id: str, size_bytes: int, config: ImageConfig) -> tuple[dict, dict]:
    """Decode, resize and patchify one image → (``images`` row, ``image_samples`` row)."""
    with as_local_file(uri) as path:
        decoded = decode_image(path, uri, config)
    width, height = decoded.rgb.size
    f = config.factor
    new_h, new_w = smart_resize(
        height,
        width,
        factor=f,
        min_pixels=config.min_tokens * f * f,
        max_pixels=config.max_tokens * f * f,
        max_ratio=MAX_ASPECT_RATIO,
    )
    # Pillow bicubic on the RGB image, as keye-vl-utils' fetch_image does (`image.resize((w, h))`): the
    # pixels the released model saw for images. (Video frames use their own resize in pretokenize.)
    resized = (
        decoded.rgb
        if (width, height) == (new_w, new_h)
        else decoded.rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    )
    patches = patchify(np.asarray(resized), config.patch_size, config.merge_size)
    grid_h, grid_w = new_h // config.patch_size, new_w // config.patch_size
    image_row = {
        "image_id": image_id,
        "uri": uri,
        "size_bytes": size_bytes,
        "format": decoded.format,
        "mode": decoded.mode,
        "width": width,
        "height": height,
        "exif_orientation": decoded.exif_orientation,
        "ingested_at": tables.now(),
    }
    sample_row = {
        "sample_id": sample_id(image_id, config),
        "image_id": image_id,
        "uri": uri,
        "config_hash": config.config_hash(),
        "height": new_h,
        "width": new_w,
        "grid_h": grid_h,
        "grid_w": grid_w,
        "num_tokens": grid_h * grid_w // (config.merge_size**2),
        "patches": patches.tobytes(),
        "created_at": tables.now(),
    }
    return image_row, sample_row


# ---------------------------------------------------------------------------------------------------------
# A shard


def ingest_images_shard(
    uris: list[str],
    config: ImageConfig = ImageConfig(),
    root: str | None = None,
    on_item: Callable[[], None] | None = None,
) -> ImageIngestReport:
    """Hash, check, decode and pre-tokenise one shard of image URIs; returns what happened to each.

    Commits: quarantine rows, then ``images`` rows, then the ``image_samples`` rows that mark an image
    done. A crash in between leaves images without samples, which the rerun finds and completes.
    """
    report = ImageIngestReport(num_seen=len(uris))
    chash = config.config_hash()
    bad: list[dict] = []

    def refuse(uri: str, reason: str, digest: str = "", config_hash: str = "") -> None:
        bad.append(tables.quarantine_row(uri, reason, STAGE, content_hash=digest, config_hash=config_hash))
        report.quarantined[uri] = reason

    hashed: dict[str, tuple[str, int]] = {}
    for uri in uris:
        try:
            hashed[uri] = content_hash(uri)
        except BadVideo as exc:  # content_hash is shared with the video path
            refuse(uri, exc.reason)
            if on_item:
                on_item()

    digests = {digest for digest, _ in hashed.values()}
    owners = tables.first_uris("images", digests, root)  # image_id -> uri it was first ingested from
    done = tables.existing_keys("image_samples", {sample_id(d, config) for d in digests}, root)
    image_rows: list[dict] = []
    sample_rows: list[dict] = []
    buffered = 0
    for uri, (digest, size) in hashed.items():
        owner = owners.get(digest)
        if owner is not None and owner != uri:
            refuse(uri, f"duplicate content: same bytes as {owner} (image_id {digest[:16]})", digest)
            report.num_duplicates += 1
        elif sample_id(digest, config) in done:
            report.num_already_present += 1
        else:
            try:
                image_row, sample_row = tokenize_image(uri, digest, size, config)
            except BadImage as exc:
                refuse(uri, exc.reason, digest, chash)
            else:
                if digest not in owners:
                    image_rows.append(image_row)
                    owners[digest] = uri
                sample_rows.append(sample_row)
                report.num_ingested += 1
                report.total_tokens += sample_row["num_tokens"]
                buffered += len(sample_row["patches"])
                if buffered > _FLUSH_BYTES:
                    tables.upsert("images", image_rows, root)
                    tables.upsert("image_samples", sample_rows, root)
                    image_rows, sample_rows, buffered = [], [], 0
        if on_item:
            on_item()
    report.num_quarantined = len(report.quarantined)
    kill_point("images.shard_tokenized")  # the shard decoded and tokenised; none of its rows written
    # A rerun re-detects the same problems; upsert writes only keys not there yet (no new version).
    tables.upsert("quarantine", bad, root)
    tables.upsert("images", image_rows, root)
    kill_point("images.images_committed")  # the shard's images rows written, its image_samples (done) not
    tables.upsert("image_samples", sample_rows, root)
    kill_point("images.shard_committed")  # the shard's rows all written; later shards not started
    return report
