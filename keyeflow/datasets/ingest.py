"""Video ingestion: register each distinct video once, quarantine what cannot be used.

Ingestion reads and hashes every file and probes it with ffprobe; it does not decode (pre-tokenisation
decodes once, at the sampling rate). Work goes in shards; each shard's rows are one Lance commit keyed on
the content hash, so a rerun after a crash re-does at most the shard that was in flight and never
duplicates a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from keyeflow.config import check_int, check_number
from keyeflow.datasets import tables
from keyeflow.datasets.video import BadVideo, VideoInfo, as_local_file, content_hash, discover, probe
from keyeflow.faults import kill_point

STAGE = "ingest"


@dataclass(frozen=True)
class IngestConfig:
    """How video ingestion works through its inputs, and what one video may cost. The number of frames a
    video is sampled at is bounded where it is decided, by the Slow-Fast config
    (:func:`keyeflow.datasets.pretokenize.max_frames`: token budget / minimum tokens per frame)."""

    shard_size: int = 16
    # Decoding reads the whole video, so its length is what a video costs in decode time: 3 hours is a
    # feature film or a long lecture; a longer recording (a day of CCTV, a stream dump) is refused.
    max_duration_s: float = 3 * 3600.0
    # Frames are decoded at full size before they are resized, and spooled to disk: one 8K UHD frame is
    # 100 MB as RGB. Anything larger than 8K UHD (7680x4320) is refused.
    max_frame_pixels: int = 7680 * 4320

    def __post_init__(self):
        object.__setattr__(
            self, "shard_size", check_int("IngestConfig", "shard_size", self.shard_size, minimum=1)
        )
        object.__setattr__(
            self,
            "max_frame_pixels",
            check_int("IngestConfig", "max_frame_pixels", self.max_frame_pixels, minimum=1),
        )
        duration = check_number("IngestConfig", "max_duration_s", self.max_duration_s, minimum=0, strict=True)
        object.__setattr__(self, "max_duration_s", duration)


def over_bound(name: str, value: str, limit: str) -> str:
    """The reason for a video over one of IngestConfig's bounds: the setting, the value found, the limit."""
    return f"over the bound {name}: {value} (limit {limit})"


def check_bounds(info: VideoInfo, config: IngestConfig) -> None:
    """Refuse a probed video that would cost more than the config allows to decode; raises BadVideo."""
    pixels = info.coded_width * info.coded_height
    if pixels > config.max_frame_pixels:
        raise BadVideo(
            info.uri,
            over_bound(
                "max_frame_pixels",
                f"{info.coded_width}x{info.coded_height} = {pixels:,} pixels per frame",
                f"{config.max_frame_pixels:,}",
            ),
        )
    if info.duration_s > config.max_duration_s:
        raise BadVideo(
            info.uri,
            over_bound("max_duration_s", f"{info.duration_s:,.2f} s", f"{config.max_duration_s:g} s"),
        )


@dataclass
class IngestReport:
    num_seen: int = 0
    num_ingested: int = 0
    num_already_present: int = 0
    num_duplicates: int = 0
    num_quarantined: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)

    def add(self, other: IngestReport) -> IngestReport:
        for name in ("num_seen", "num_ingested", "num_already_present", "num_duplicates", "num_quarantined"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.quarantined.update(other.quarantined)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def plan_shards(paths: list[str], config: IngestConfig = IngestConfig()) -> list[list[str]]:
    uris = discover(paths)
    return [uris[i : i + config.shard_size] for i in range(0, len(uris), config.shard_size)]


def ingest_shard(
    uris: list[str],
    root: str | None = None,
    on_item: Callable[[], None] | None = None,
    config: IngestConfig = IngestConfig(),
) -> IngestReport:
    """Hash, probe and register one shard of video URIs; returns what happened to each (a video over one
    of ``config``'s bounds is quarantined with the bound's name and its value)."""
    report = IngestReport(num_seen=len(uris))
    hashed: dict[str, tuple[str, int]] = {}
    bad: list[dict] = []
    for uri in uris:
        try:
            hashed[uri] = content_hash(uri)
        except BadVideo as exc:
            bad.append(tables.quarantine_row(uri, exc.reason, STAGE))
            report.quarantined[uri] = exc.reason
            if on_item:
                on_item()

    present = tables.existing_keys("videos", {digest for digest, _ in hashed.values()}, root)
    owners = tables.first_uris("videos", present, root)
    rows: list[dict] = []
    for uri, (digest, size) in hashed.items():
        if digest in owners or digest in {r["video_id"] for r in rows}:
            first = owners.get(digest) or next(r["uri"] for r in rows if r["video_id"] == digest)
            if first == uri:
                report.num_already_present += 1
            else:
                reason = f"duplicate content: same bytes as {first} (video_id {digest[:16]})"
                bad.append(tables.quarantine_row(uri, reason, STAGE, content_hash=digest))
                report.num_duplicates += 1
        else:
            try:
                with as_local_file(uri) as path:
                    info = probe(uri, path, size)
                check_bounds(info, config)
            except BadVideo as exc:
                bad.append(tables.quarantine_row(uri, exc.reason, STAGE, content_hash=digest))
                report.quarantined[uri] = exc.reason
            else:
                rows.append({"video_id": digest, **asdict(info), "ingested_at": tables.now()})
                report.num_ingested += 1
        if on_item:
            on_item()
    report.num_quarantined = len(report.quarantined)
    kill_point("ingest.shard_probed")  # the shard hashed and probed; none of its rows written
    # Quarantine first: if we die between the two commits, the rerun re-finds the good videos missing
    # and redoes them, while the quarantine rows (keyed) are not written twice.
    tables.upsert("quarantine", bad, root)
    kill_point("ingest.quarantine_committed")  # the shard's quarantine rows written, its videos rows not
    tables.upsert("videos", rows, root)
    kill_point("ingest.shard_committed")  # the shard's rows all written; later shards not started
    return report
