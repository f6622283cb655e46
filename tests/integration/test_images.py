"""The image path on real files: Pillow-drawn samples and bad inputs, real Lance tables and DuckDB."""

from __future__ import annotations

import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from keyeflow.datasets import sql, tables
from keyeflow.datasets.images import (
    STAGE,
    ImageConfig,
    ImageIngestReport,
    discover_images,
    ingest_images_shard,
    load_image_patches,
    plan_image_shards,
)
from keyeflow.datasets.ingest import IngestConfig
from keyeflow.datasets.pretokenize import patchify, unpatchify
from keyeflow.synthetic.images import (
    EXIF_EXPECTED_QUADRANTS,
    describe_image,
    exif_upright,
    generate_bad_images,
    generate_images,
)

IMAGE_TABLES = ("images", "image_samples", "quarantine")


@pytest.fixture(scope="session")
def sample_images(media_dir) -> list[Path]:
    return generate_images(media_dir / "images")


@pytest.fixture(scope="session")
def bad_images(media_dir) -> dict[str, Path]:
    return generate_bad_images(media_dir / "bad_images")


@pytest.fixture()
def image_batch(tmp_path, sample_images, bad_images) -> Path:
    """Every sample, every bad input and one renamed copy of a sample (a duplicate), in one folder."""
    folder = tmp_path / "image_batch"
    folder.mkdir()
    for path in [*sample_images, *bad_images.values()]:
        target = folder / path.name
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        else:
            shutil.copy(path, target)
    shutil.copy(sample_images[0], folder / f"copy of {sample_images[0].name}")
    return folder


def ingest(paths, config: ImageConfig | None = None, shard_size: int = 16) -> ImageIngestReport:
    config = config or ImageConfig()
    report = ImageIngestReport()
    for shard in plan_image_shards([str(p) for p in paths], IngestConfig(shard_size)):
        report.add(ingest_images_shard(shard, config))
    return report


def rows_by_name(name: str, config: ImageConfig | None = None) -> dict[str, dict]:
    rows = tables.open_table(name).to_table().to_pylist()
    if config is not None:
        rows = [r for r in rows if r["config_hash"] == config.config_hash()]
    return {os.path.basename(r["uri"]): r for r in rows}


def picture(sample: dict) -> np.ndarray:
    """The stored sample back as an H×W×3 image."""
    patches = load_image_patches(sample)
    assert patches.shape == (sample["grid_h"] * sample["grid_w"], 3 * 14 * 14)
    image = unpatchify(patches, sample["grid_h"], sample["grid_w"], 14, 2)
    assert image.shape == (sample["height"], sample["width"], 3)
    return image


def versions() -> dict[str, int]:
    return {name: tables.ref(name).version for name in IMAGE_TABLES}


def test_every_sample_ingests_within_the_token_range(home, sample_images):
    config = ImageConfig()
    report = ingest(sample_images, config, shard_size=4)
    assert report.num_ingested == len(sample_images), report.quarantined
    assert report.num_quarantined == 0 and not tables.open_table("quarantine").count_rows()

    samples = rows_by_name("image_samples")
    assert set(samples) == {p.name for p in sample_images}
    for name, s in samples.items():
        assert s["height"] % 28 == 0 and s["width"] % 28 == 0, name
        assert (s["grid_h"], s["grid_w"]) == (s["height"] // 14, s["width"] // 14), name
        assert s["num_tokens"] == s["grid_h"] * s["grid_w"] // 4 == s["height"] * s["width"] // 784, name
        assert 4 <= s["num_tokens"] <= 20_480, name
        assert s["config_hash"] == config.config_hash()
        assert s["sample_id"] == f"{s['image_id'][:16]}-{config.config_hash()}"
    assert report.total_tokens == sum(s["num_tokens"] for s in samples.values())

    # 4800x3600 is 22,040 tokens at full size: capped to at most 20,480, aspect ratio kept.
    large = samples["large_scene_4800x3600.jpg"]
    assert 0.95 * 20_480 < large["num_tokens"] <= 20_480
    assert abs(large["width"] / large["height"] - 4 / 3) < 0.01
    small = samples["small_tall_60x400.png"]
    assert (small["height"], small["width"]) == (392, 56)

    images = rows_by_name("images")
    assert {r["format"] for r in images.values()} == {"JPEG", "PNG", "WEBP", "GIF", "BMP"}
    modes = {name: r["mode"] for name, r in images.items()}
    assert modes["logo_rgba_512x512.png"] == "RGBA"
    assert modes["icons_palette_256x256.png"] == "P"
    assert modes["grey16_640x480.png"] == "I;16"
    assert modes["cmyk_poster_600x800.jpg"] == "CMYK"
    assert modes["document_1240x1754.png"] == "L"
    assert (images["large_scene_4800x3600.jpg"]["width"], images["large_scene_4800x3600.jpg"]["height"]) == (
        4800,
        3600,
    )
    assert images["gradient_1024x768.jpg"]["size_bytes"] == sample_images[0].stat().st_size

    # The tables are what `keyeflow sql` sees.
    by_format = sql.query(
        "select i.format, count(*) as n, sum(s.num_tokens) as tokens "
        "from image_samples s join images i using (image_id) group by i.format"
    )
    assert int(by_format.n.sum()) == len(sample_images)
    assert int(by_format.tokens.sum()) == report.total_tokens


def test_exif_orientation_is_applied_to_the_pixels(home, sample_images):
    path = next(p for p in sample_images if p.name == "exif_rotated_orient6.jpg")
    with Image.open(path) as stored:
        assert stored.size == (672, 448)  # landscape on disk
    ingest([path])
    image_row = rows_by_name("images")[path.name]
    assert (image_row["width"], image_row["height"], image_row["exif_orientation"]) == (448, 672, 6)
    sample = rows_by_name("image_samples")[path.name]
    assert (sample["height"], sample["width"]) == (672, 448)

    pixels = picture(sample).astype(np.int16)
    quadrants = {
        "top-left": pixels[20:316, 20:204],
        "top-right": pixels[20:316, 244:428],
        "bottom": pixels[356:652, 20:428],
    }
    for (where, region), colour in zip(quadrants.items(), EXIF_EXPECTED_QUADRANTS):
        assert np.abs(region.mean(axis=(0, 1)) - colour).max() < 8, (where, region.mean(axis=(0, 1)), colour)
    # Against the picture as drawn upright: only JPEG noise apart.
    assert np.abs(pixels - np.asarray(exif_upright(), dtype=np.int16)).mean() < 3


def test_transparency_goes_over_white_and_16_bit_grey_is_scaled(home, sample_images):
    ingest(sample_images)
    samples = rows_by_name("image_samples")

    logo = picture(samples["logo_rgba_512x512.png"])
    assert (logo[:24, :24] == 255).all() and (logo[-24:, -24:] == 255).all()
    assert logo[300, 130].tolist() == [20, 60, 160]  # the opaque disc keeps its colour

    icons = picture(samples["icons_palette_256x256.png"]).astype(np.int16)
    magenta = (icons[..., 0] > 180) & (icons[..., 1] < 90) & (icons[..., 2] > 180)
    assert not magenta.any(), "the transparent palette colour leaked into the pixels"
    assert (icons[60, 125] == 255).all()  # background between two icons

    grey = picture(samples["grey16_640x480.png"]).astype(np.int16)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey[100, :10].max() < 8 and grey[100, -10:].min() > 247
    assert abs(int(grey[100, grey.shape[1] // 2 - 40, 0]) - 112) < 10  # a ramp, not clipped to white
    assert 100 < grey.mean() < 155

    cmyk = picture(samples["cmyk_poster_600x800.jpg"]).astype(np.int16)
    assert np.abs(cmyk[20, 20] - (255, 240, 0)).max() < 30  # yellow corner stays yellow


def test_patches_round_trip_to_the_resized_image(home, sample_images):
    ingest(sample_images)
    samples = rows_by_name("image_samples")
    for name, sample in samples.items():
        image = picture(sample)
        np.testing.assert_array_equal(patchify(image, 14, 2), load_image_patches(sample), err_msg=name)
    # Plain RGB files: the stored pixels are exactly the file resized bicubically to the sample size.
    for name in (
        "gradient_1024x768.jpg",
        "shapes_800x600.png",
        "bar_chart_900x600.webp",
        "bitmap_128x96.bmp",
        "large_scene_4800x3600.jpg",
    ):
        sample = samples[name]
        with Image.open(next(p for p in sample_images if p.name == name)) as source:
            expected = np.asarray(
                source.convert("RGB").resize((sample["width"], sample["height"]), Image.Resampling.BICUBIC)
            )
        np.testing.assert_array_equal(picture(sample), expected, err_msg=name)


EXPECTED_QUARANTINE = {
    "corrupt": "corrupt or not an image: the bytes match no supported format",
    "truncated": "corrupt or truncated image data: image file is truncated",
    "huge_header": "possible decompression bomb: header claims 2,500,000,000 pixels",
    "one_pixel": "too small: 1x1 pixels (each side must be at least 8)",
    "not_image": "not an image: the file holds plain text (named .png)",
    "extreme_aspect": "extreme aspect ratio 3000x10 (300:1, limit 200:1)",
    "empty": "empty file (0 bytes)",
    "unreadable": "unreadable: file not found",
}


def test_bad_images_are_quarantined_with_reasons_and_the_rest_goes_through(
    home, image_batch, bad_images, sample_images
):
    config = ImageConfig()
    report = ingest([image_batch], config, shard_size=4)

    quarantined = rows_by_name("quarantine")
    assert {r["stage"] for r in quarantined.values()} == {STAGE}
    for key, reason in EXPECTED_QUARANTINE.items():
        row = quarantined[bad_images[key].name]
        assert row["reason"].startswith(reason), (key, row["reason"])
    # Problems found after hashing carry the content hash and the config that refused them.
    assert quarantined[bad_images["one_pixel"].name]["config_hash"] == config.config_hash()
    assert len(quarantined[bad_images["truncated"].name]["content_hash"]) == 64

    # Same bytes under two names: the first in sorted order is kept, the other is a counted duplicate.
    original, copy = sample_images[0].name, f"copy of {sample_images[0].name}"
    assert report.num_duplicates == 1
    assert quarantined[original]["reason"].startswith(
        f"duplicate content: same bytes as {image_batch / copy}"
    )
    assert copy not in quarantined

    samples = rows_by_name("image_samples")
    assert set(samples) == {p.name for p in sample_images[1:]} | {copy}
    assert report.num_ingested == len(sample_images)
    assert report.num_quarantined == len(bad_images) + 1

    # Nothing is lost: every file found is either a sample or a quarantine row, never both.
    found = {os.path.basename(u) for u in discover_images([str(image_batch)])}
    assert found == set(samples) | set(quarantined)
    assert not set(samples) & set(quarantined)


def test_a_truncated_file_is_quarantined_even_when_a_library_allowed_truncated_loads(
    home, image_batch, bad_images, monkeypatch
):
    """Pillow's LOAD_TRUNCATED_IMAGES is process-wide and lmms-eval turns it on at import: ingestion still
    refuses the truncated file instead of storing it with grey rows."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    ingest([image_batch], ImageConfig(), shard_size=4)
    quarantined = rows_by_name("quarantine")
    assert quarantined[bad_images["truncated"].name]["reason"].startswith(EXPECTED_QUARANTINE["truncated"])
    assert bad_images["truncated"].name not in rows_by_name("image_samples")


def test_rerun_writes_nothing_and_a_config_change_retokenises(home, image_batch, sample_images):
    first = ImageConfig()
    ingest([image_batch], first, shard_size=5)
    before = versions()
    counts = {name: tables.open_table(name).count_rows() for name in IMAGE_TABLES}

    again = ingest([image_batch], first, shard_size=5)
    assert versions() == before, "a rerun must not commit anything"
    assert again.num_ingested == 0 and again.num_already_present == len(sample_images)
    assert again.num_duplicates == 1

    smaller = ImageConfig(max_tokens=256)
    redone = ingest([image_batch], smaller, shard_size=5)
    assert redone.num_ingested == len(sample_images)
    assert tables.ref("images").version == before["images"], "known images are not registered again"
    by_config = sql.query(
        "select config_hash, count(*) as n, max(num_tokens) as most from image_samples "
        "group by config_hash order by config_hash"
    )
    assert set(by_config.config_hash) == {first.config_hash(), smaller.config_hash()}
    assert list(by_config.n) == [len(sample_images)] * 2
    assert int(by_config.set_index("config_hash").most[smaller.config_hash()]) <= 256
    # The first config's rows are untouched and still readable at their version.
    old = tables.open_table("image_samples", version=before["image_samples"])
    assert old.count_rows() == counts["image_samples"]


def test_header_limits_refuse_before_anything_is_decoded(home, sample_images, bad_images, monkeypatch):
    def no_decoding(self):
        raise AssertionError(f"decoded {self.filename}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    large = next(p for p in sample_images if p.name == "large_scene_4800x3600.jpg")
    strict = ImageConfig(max_header_pixels=1_000_000)
    report = ingest([large, bad_images["huge_header"]], strict)
    assert report.quarantined[str(large)] == (
        "possible decompression bomb: header claims 4800x3600 = 17,280,000 pixels (limit 1,000,000); "
        "not decoded"
    )
    assert report.quarantined[str(bad_images["huge_header"])].startswith("possible decompression bomb")
    assert report.num_ingested == 0
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= strict.max_header_pixels


def test_config_is_validated_and_hashed():
    for kwargs, field in [
        ({"min_tokens": 0}, "min_tokens"),
        ({"max_tokens": 3}, "max_tokens"),
        ({"patch_size": "14"}, "patch_size"),
        ({"min_side": True}, "min_side"),
        ({"max_header_pixels": 10}, "max_header_pixels"),
    ]:
        with pytest.raises(ValueError, match=f"ImageConfig.{field}"):
            ImageConfig(**kwargs)
    assert ImageConfig().config_hash() == ImageConfig(max_tokens=20_480).config_hash()
    assert ImageConfig().config_hash() != ImageConfig(max_tokens=16_384).config_hash()
    assert ImageConfig(min_tokens=np.int64(4)).config_hash() == ImageConfig().config_hash()


def test_generated_samples_are_small_fast_and_deterministic(tmp_path, sample_images, bad_images):
    start = time.perf_counter()
    again = generate_images(tmp_path / "again")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"generation took {elapsed:.1f}s"
    assert sum(p.stat().st_size for p in again) < 2_000_000
    assert len(again) >= 12
    for first, second in zip(sample_images, again):
        assert first.read_bytes() == second.read_bytes(), first.name

    data = bad_images["huge_header"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 1024
    offset = 8
    kinds = []
    while offset < len(data):  # every chunk well formed, CRC included
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        kinds.append(kind)
        offset += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">II", data[16:24]) == (50_000, 50_000)
    with Image.open(bad_images["extreme_aspect"]) as wide, Image.open(bad_images["one_pixel"]) as dot:
        assert wide.size == (3000, 10) and dot.size == (1, 1)
    assert os.path.islink(bad_images["unreadable"]) and not bad_images["unreadable"].exists()


def test_every_picture_states_what_it_shows_within_its_frame(sample_images):
    """The corpus's captions, grounding and OCR read describe_image: its size is the picture's as shown
    upright, every region it points at lies on the picture, and the page's text stops where the page does."""
    for path in sample_images:
        scene = describe_image(path.name)
        assert scene is not None, path.name
        with Image.open(path) as image:
            assert scene.size == ImageOps.exif_transpose(image).size, path.name
        width, height = scene.size
        for phrase, (x1, y1, x2, y2) in scene.regions:
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (path.name, phrase)
    assert describe_image("scan_of_receipt.jpg") is None
    page = describe_image("document_1240x1754.png")
    # The title, four whole sections (heading and eight lines) and the fifth one's heading and two lines.
    assert page.text[0] == "Keye-VL sample report" and len(page.text) == 1 + 4 * 9 + 3
