"""Sample videos and bad inputs, generated on the spot with ffmpeg's own lavfi sources.

Nothing binary is shipped and nothing is downloaded: every clip is synthesised by ffmpeg's test sources
(testsrc/testsrc2, smptebars, mandelbrot, cellauto, life, color, sine), so tests, demos and the tiny
end-to-end run have real video files on any machine that has ffmpeg. Encoders run single-threaded with
bit-exact flags and fixed seeds, so the same ffmpeg build writes byte-identical files on every run.

Good clips (``generate_videos``), ~8 clips, 3-10 s each, under 3 MB together:

=========================================  =====  ======  =====  =====================================
file                                       size   fps     secs   what it exercises
=========================================  =====  ======  =====  =====================================
cuts_640x360_h264_25fps.mp4                16:9   25      8      hard scene cuts between four sources
                                                                 (testsrc2, smptebars, mandelbrot,
                                                                 cellauto); has an AAC sine audio track
static_then_motion_320x240_mpeg4_30fps.avi 4:3    30      7      a still frame held 3 s, motion (life),
                                                                 a still colour held 2 s; MPEG-4 pt 2
                                                                 in AVI
pan_1280x720_h264_30fps.mp4                16:9   30      6      slow horizontal pan (crop with x=t*100)
                                                                 over a static 1920x720 picture
zoom_640x360_h264_60fps.mp4                16:9   60      3      smooth zoom-in (zoompan), high fps
portrait_360x640_vp9_30fps.webm            9:16   30      4      portrait phone-style clip; VP9/WebM
                                                                 (H.264/MP4 if libvpx-vp9 is missing)
wide_840x360_mjpeg_24fps.mkv               21:9   24      4      cinema-wide aspect; MJPEG in Matroska
                                                                 (every frame a keyframe); bars, then a
                                                                 box sliding over a flat background
life_320x240_h264_12fps.mp4                4:3    12      9      low frame rate, long, constant small
                                                                 motion (Game of Life, fixed seed)
solid_colors_640x480_mpeg4_25fps.mp4       4:3    25      5      flat colour shots, cut every second;
                                                                 near-identical frames; MPEG-4 in MP4
=========================================  =====  ======  =====  =====================================

What each good clip shows (``describe_video``: a ``VideoScene`` of its shots, their times and motion, the
sound track) is written beside the filter graphs, for the corpus's captions and questions about the clips.

Bad inputs (``generate_bad_videos``), keyed by the short names below, written to one directory:

================  ==========================================  ===========================================
key               file                                        what an ingestion must do with it
================  ==========================================  ===========================================
zero_byte         zero_byte.mp4                               empty file: reject, do not crash
truncated         truncated.mp4                               first 40% of an MP4 whose moov atom is at
                                                              the end: no index, unreadable
truncated_tail    truncated_tail.mp4                          first 40% of a +faststart MP4: the header
                                                              probes fine (claims 2 s), the data stops
                                                              early; decoding yields fewer frames
text_as_mp4       text_as.mp4                                 a text file with a video extension
audio_only        audio_only.mp4                              MP4 with only a sine AAC stream, no video
unreadable        dangling.mp4                                dangling symlink: listed by a directory
                                                              scan, cannot be opened (works as root,
                                                              where chmod 000 would not block reads)
one_frame         one_frame.mp4                               exactly one frame, shown for 1 s (1 fps)
extreme_wide      extreme_wide_2000x8.mp4                     aspect 250: should be rejected by an
                                                              aspect-ratio gate
extreme_tall_ok   extreme_tall_56x1400.mp4                    aspect 25: odd but still valid
rotated           rotated_640x360_rot90.mp4                   640x360 stored, display matrix says rotate
                                                              90 degrees (shown as 360x640)
vfr               vfr_10then30fps.mp4                         variable frame rate: 1 s at 10 fps then 1 s
                                                              at 30 fps; r_frame_rate != avg_frame_rate
ten_bit           ten_bit_h264_high10.mp4                     yuv420p10le (H.264 High 10; HEVC Main 10 if
                                                              libx264 lacks 10-bit)
name_spaces       my clip with spaces.mp4                     spaces in the file name
name_quotes       it's a "quoted" clip.mp4                    both quote characters in the file name
name_unicode      vidéo_日本語_клип.mp4                       non-ASCII file name (NFC)
================  ==========================================  ===========================================

All the good-but-odd bad inputs (one_frame, extreme_*, rotated, vfr, ten_bit, name_*) are real playable
videos of 1-3 s. Run ``python -m keyeflow.synthetic.videos DEST`` to write the clips to DEST and the bad
inputs to DEST/bad.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TASK_SHOT_COLOURS",
    "Shot",
    "VideoScene",
    "colour_shots_clip",
    "describe_video",
    "generate_bad_videos",
    "generate_videos",
    "main",
]

FFMPEG = "ffmpeg"

# Options that make a rerun byte-identical: no encoder version strings or random Matroska UIDs (bitexact),
# no creation times copied from anywhere (map_metadata -1), and one thread, because multi-threaded encoders
# (libvpx in particular) may pick different decisions from run to run.
_DETERMINISTIC = [
    "-fflags",
    "+bitexact",
    "-flags:v",
    "+bitexact",
    "-flags:a",
    "+bitexact",
    "-map_metadata",
    "-1",
    "-threads",
    "1",
]

# Quality settings are deliberately low: the clips exist to exercise decoding, probing and sampling, not to
# look good, and small files keep the whole set under 3 MB and fast to generate.
_H264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "32", "-pix_fmt", "yuv420p"]
# mbd rd lets mpeg4 skip unchanged macroblocks (the default decision codes flat colour frames at ~4 KB each);
# a 2 s GOP is closer to real AVI/MP4 files than the encoder's default of 12 frames.
_MPEG4 = ["-c:v", "mpeg4", "-q:v", "8", "-mbd", "rd", "-g", "60", "-pix_fmt", "yuv420p"]
_MJPEG = ["-c:v", "mjpeg", "-q:v", "12", "-pix_fmt", "yuvj420p"]
# realtime + cpu-used 8 is libvpx's fastest mode; crf with b:v 0 is its constant-quality mode.
_VP9 = [
    "-c:v",
    "libvpx-vp9",
    "-deadline",
    "realtime",
    "-cpu-used",
    "8",
    "-crf",
    "55",
    "-b:v",
    "0",
    "-row-mt",
    "0",
    "-pix_fmt",
    "yuv420p",
]
_AAC = ["-c:a", "aac", "-b:a", "32k"]


@dataclass(frozen=True)
class _Clip:
    """One file to synthesise: a filter graph whose outputs are labelled [v] and/or [a]."""

    name: str
    graph: str
    codec_args: tuple[str, ...]


@functools.cache
def _encoders() -> str:
    """The text of `ffmpeg -encoders`, read once; tells which optional encoders this build has."""
    result = subprocess.run(
        [FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True, check=False
    )
    return result.stdout


def _has_encoder(name: str) -> bool:
    # Lines look like " V....D libx264   libx264 H.264 ...": flags, then the encoder's name.
    return any(line.split()[1:2] == [name] for line in _encoders().splitlines())


@functools.cache
def _encoder_help(encoder: str) -> str:
    """`ffmpeg -h encoder=NAME`, which lists the pixel formats this build of the encoder accepts."""
    result = subprocess.run(
        [FFMPEG, "-hide_banner", "-h", f"encoder={encoder}"], capture_output=True, text=True, check=False
    )
    return result.stdout


def _run_ffmpeg(args: list[str], what: str) -> None:
    """Run ffmpeg with an argument list (never a shell string: file names contain quotes)."""
    cmd = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"ffmpeg failed making {what} (exit {result.returncode}):\n{tail}")


def _partial_path(path: Path) -> Path:
    # Same suffix so ffmpeg picks the right muxer; a leading dot so a directory scan that skips hidden files
    # never ingests a half-written clip left behind by a crash.
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _encode(clip: _Clip, path: Path) -> None:
    """Write clip to path atomically: encode to a hidden partial file, then rename over the target."""
    partial = _partial_path(path)
    maps = [arg for label in ("[v]", "[a]") if label in clip.graph for arg in ("-map", label)]
    try:
        _run_ffmpeg(
            ["-filter_complex", clip.graph, *maps, *clip.codec_args, *_DETERMINISTIC, str(partial)], clip.name
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _still(source: str, frames: int) -> str:
    """A filter chain that holds the first frame of source for `frames` frames (a static shot)."""
    # loop repeats the one buffered frame and gives each copy the next timestamp at the source's rate.
    return f"{source},trim=end_frame=1,loop=loop={frames - 1}:size=1:start=0"


def _good_clips() -> list[_Clip]:
    cuts = (
        "testsrc2=s=640x360:r=25:d=2,setsar=1[c0];"
        "smptebars=s=640x360:r=25:d=2,setsar=1[c1];"
        "mandelbrot=s=640x360:r=25:maxiter=300,trim=duration=2,setpts=PTS-STARTPTS,setsar=1[c2];"
        "cellauto=s=640x360:r=25:rule=110:seed=7,trim=duration=2,setpts=PTS-STARTPTS,setsar=1[c3];"
        "[c0][c1][c2][c3]concat=n=4:v=1:a=0,format=yuv420p[v];"
        "sine=frequency=440:sample_rate=22050:duration=8[a]"
    )
    static = (
        f"{_still('testsrc=s=320x240:r=30', 90)},setsar=1[s0];"
        "life=s=80x60:r=30:seed=42:ratio=0.3:life_color=#00ff80:death_color=#202020,"
        "trim=duration=2,setpts=PTS-STARTPTS,scale=320:240:flags=neighbor,setsar=1[s1];"
        "color=c=steelblue:s=320x240:r=30:d=2,setsar=1[s2];"
        "[s0][s1][s2]concat=n=3:v=1:a=0,format=yuv420p[v]"
    )
    # A static picture wider than the frame and a crop window sliding at 100 px/s: a slow, steady pan.
    pan = f"{_still('testsrc=s=1920x720:r=30', 180)},crop=w=1280:h=720:x='t*100':y=0,format=yuv420p[v]"
    # zoompan emits d frames per input frame, so one still input frame becomes the whole 3 s clip.
    zoom = (
        "testsrc2=s=1280x720:r=60,trim=end_frame=1,"
        "zoompan=z='1+0.004*on':x='iw/2-iw/zoom/2':y='ih/2-ih/zoom/2':d=180:s=640x360:fps=60,"
        "format=yuv420p[v]"
    )
    portrait = (
        "testsrc2=s=360x640:r=30:d=2,setsar=1[p0];"
        "mandelbrot=s=360x640:r=30:maxiter=300,trim=duration=2,setpts=PTS-STARTPTS,setsar=1[p1];"
        "[p0][p1]concat=n=2:v=1:a=0,format=yuv420p[v]"
    )
    # Every MJPEG frame is a full JPEG, so the second shot is flat (a box sliding over a plain background)
    # rather than busy. Not the gradients source: in ffmpeg 5.1 it differs from run to run even with a seed.
    wide = (
        "smptehdbars=s=840x360:r=24:d=2,setsar=1[w0];"
        "color=c=0x3060a0:s=840x360:r=24:d=2,"
        "drawbox=x='40+t*300':y=100:w=160:h=160:c=yellow:t=fill,setsar=1[w1];"
        "[w0][w1]concat=n=2:v=1:a=0,format=yuvj420p[v]"
    )
    # Cells 4x4 pixels wide (nearest-neighbour upscale): one-pixel cells are noise that no codec compresses.
    life = (
        "life=s=80x60:r=12:seed=1234:ratio=0.25:mold=20:mold_color=#a03020,"
        "trim=duration=9,setpts=PTS-STARTPTS,scale=320:240:flags=neighbor,format=yuv420p[v]"
    )
    # Colours with distinct brightness (not red then green, which have almost the same luma), so a cut
    # detector working on grey levels sees every cut.
    solid = ";".join(
        f"color=c={c}:s=640x480:r=25:d=1,setsar=1[k{i}]"
        for i, c in enumerate(["red", "lime", "blue", "black", "white"])
    )
    solid += ";[k0][k1][k2][k3][k4]concat=n=5:v=1:a=0,format=yuv420p[v]"

    if _has_encoder("libvpx-vp9"):
        portrait_clip = _Clip("portrait_360x640_vp9_30fps.webm", portrait, tuple(_VP9))
    else:
        portrait_clip = _Clip("portrait_360x640_h264_30fps.mp4", portrait, tuple(_H264))
    return [
        _Clip("cuts_640x360_h264_25fps.mp4", cuts, (*_H264, *_AAC)),
        _Clip("static_then_motion_320x240_mpeg4_30fps.avi", static, tuple(_MPEG4)),
        _Clip("pan_1280x720_h264_30fps.mp4", pan, tuple(_H264)),
        _Clip("zoom_640x360_h264_60fps.mp4", zoom, tuple(_H264)),
        portrait_clip,
        _Clip("wide_840x360_mjpeg_24fps.mkv", wide, tuple(_MJPEG)),
        _Clip("life_320x240_h264_12fps.mp4", life, tuple(_H264)),
        _Clip("solid_colors_640x480_mpeg4_25fps.mp4", solid, tuple(_MPEG4)),
    ]


@dataclass(frozen=True)
class Shot:
    start: float  # seconds
    end: float
    what: str  # a noun phrase: "static SMPTE colour bars"
    motion: str  # a clause about movement inside the shot


@dataclass(frozen=True)
class VideoScene:
    """What a clip shows, written beside the filter graph that makes it: what the corpus's captions and
    questions about that clip say."""

    seconds: float
    fps: int
    size: tuple[int, int]
    shots: tuple[Shot, ...]
    audio: str | None = None  # a noun phrase for the sound track, None when silent


# What each clip of _good_clips shows, keyed by the start of its file name: the portrait clip is VP9/WebM or
# H.264/MP4, depending on the ffmpeg build.
_SCENES: dict[str, VideoScene] = {
    "cuts_640x360": VideoScene(
        8,
        25,
        (640, 360),
        (
            Shot(
                0,
                2,
                "a colour test card with moving elements and a running counter",
                "small markers sweep across the card while the counter ticks upward",
            ),
            Shot(2, 4, "static SMPTE colour bars", "nothing moves; the bars hold perfectly still"),
            Shot(
                4, 6, "a colourful Mandelbrot fractal", "the fractal shifts slowly as the view drifts inward"
            ),
            Shot(
                6,
                8,
                "a black-and-white cellular automaton pattern",
                "new rows of cells keep appearing, so the pattern appears to crawl",
            ),
        ),
        audio="a steady 440 Hz sine tone",
    ),
    "static_then_motion_320x240": VideoScene(
        7,
        30,
        (320, 240),
        (
            Shot(0, 3, "a frozen colour test pattern", "the frame is held completely still"),
            Shot(
                3,
                5,
                "green Game of Life cells on a dark grey field",
                "cells are born and die every frame, so the field flickers with small changes",
            ),
            Shot(5, 7, "a flat steel-blue screen", "the colour never changes"),
        ),
    ),
    "pan_1280x720": VideoScene(
        6,
        30,
        (1280, 720),
        (
            Shot(
                0,
                6,
                "a wide test pattern seen through a window that pans to the right",
                "the picture slides steadily to the left at about 100 pixels per second",
            ),
        ),
    ),
    "zoom_640x360": VideoScene(
        3,
        60,
        (640, 360),
        (
            Shot(
                0,
                3,
                "a colour test card that the camera zooms into",
                "the card grows smoothly towards its centre with every frame",
            ),
        ),
    ),
    "portrait_360x640": VideoScene(
        4,
        30,
        (360, 640),
        (
            Shot(0, 2, "a tall colour test card with moving markers", "markers travel across the card"),
            Shot(2, 4, "a Mandelbrot fractal in portrait format", "the fractal changes slowly"),
        ),
    ),
    "wide_840x360": VideoScene(
        4,
        24,
        (840, 360),
        (
            Shot(0, 2, "high-definition colour bars", "the bars stay still"),
            Shot(
                2,
                4,
                "a yellow square gliding across a blue background",
                "the square travels from the left side towards the right at a constant speed",
            ),
        ),
    ),
    "life_320x240": VideoScene(
        9,
        12,
        (320, 240),
        (
            Shot(
                0,
                9,
                "Game of Life cells evolving, with dead cells leaving reddish-brown traces",
                "the population changes a little in every frame, never settling",
            ),
        ),
    ),
    "solid_colors_640x480": VideoScene(
        5,
        25,
        (640, 480),
        (
            Shot(0, 1, "a solid red screen", "the colour is constant"),
            Shot(1, 2, "a solid lime-green screen", "the colour is constant"),
            Shot(2, 3, "a solid blue screen", "the colour is constant"),
            Shot(3, 4, "a solid black screen", "the colour is constant"),
            Shot(4, 5, "a solid white screen", "the colour is constant"),
        ),
    ),
}


def describe_video(name: str) -> VideoScene | None:
    """What the generated clip that a file name starts with shows; None for a name that is no clip's."""
    for key, scene in _SCENES.items():
        if name.startswith(key):
            return scene
    return None


def generate_videos(dest: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the small varied set of clips into dest and return the paths, in a fixed order.

    Existing files are kept (and not re-encoded) unless overwrite, so calling this again is cheap.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for clip in _good_clips():
        path = dest / clip.name
        if overwrite or not path.exists():
            _encode(clip, path)
        paths.append(path)
    return paths


def _small(source: str, size: str, rate: int, seconds: float, pix_fmt: str = "yuv420p") -> str:
    return f"{source}=s={size}:r={rate}:d={seconds},format={pix_fmt}[v]"


def _truncate_copy(src: Path, dst: Path, fraction: float) -> None:
    data = src.read_bytes()
    partial = _partial_path(dst)
    partial.write_bytes(data[: int(len(data) * fraction)])
    os.replace(partial, dst)


def _bad_clips() -> dict[str, _Clip]:
    """The bad inputs that are plain ffmpeg encodes (the rest are made by hand in generate_bad_videos)."""
    h264 = tuple(_H264)
    ten_bit_graph = _small("testsrc2", "320x180", 25, 2, pix_fmt="yuv420p10le")
    # Debian's libx264 is built for 8 and 10 bit; some builds are 8-bit only, and then HEVC Main 10 is the
    # common 10-bit format a real corpus would contain.
    if "yuv420p10le" in _encoder_help("libx264"):
        ten_bit = _Clip(
            "ten_bit_h264_high10.mp4",
            ten_bit_graph,
            (
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                "30",
                "-profile:v",
                "high10",
                "-pix_fmt",
                "yuv420p10le",
            ),
        )
    else:
        ten_bit = _Clip(
            "ten_bit_hevc_main10.mp4",
            ten_bit_graph,
            (
                "-c:v",
                "libx265",
                "-preset",
                "ultrafast",
                "-crf",
                "30",
                "-pix_fmt",
                "yuv420p10le",
                "-x265-params",
                "log-level=error:pools=1:frame-threads=1",
                "-tag:v",
                "hvc1",
            ),
        )
    return {
        "audio_only": _Clip(
            "audio_only.mp4", "sine=frequency=330:sample_rate=22050:duration=2[a]", tuple(_AAC)
        ),
        # One frame at 1 fps: a valid clip that lasts 1 s but offers a sampler exactly one frame.
        "one_frame": _Clip(
            "one_frame.mp4", "testsrc2=s=320x180:r=1,trim=end_frame=1,format=yuv420p[v]", h264
        ),
        "extreme_wide": _Clip("extreme_wide_2000x8.mp4", _small("testsrc2", "2000x8", 25, 1), h264),
        "extreme_tall_ok": _Clip("extreme_tall_56x1400.mp4", _small("testsrc2", "56x1400", 25, 1), h264),
        # Speeds differ so a frame sampler sees 10 frames in the first second and 30 in the second; a
        # shared 1/30 time base keeps every pts exact instead of rounded.
        "vfr": _Clip(
            "vfr_10then30fps.mp4",
            "testsrc2=s=320x180:r=10:d=1,settb=1/30[f0];"
            "testsrc2=s=320x180:r=30:d=1,settb=1/30[f1];"
            "[f0][f1]concat=n=2:v=1:a=0,format=yuv420p[v]",
            (*h264, "-fps_mode", "vfr"),
        ),
        "ten_bit": ten_bit,
        # Distinct content per awkward name, so a content-hash dedup does not fold them into one row.
        "name_spaces": _Clip("my clip with spaces.mp4", _small("testsrc2", "320x180", 25, 1), h264),
        "name_quotes": _Clip('it\'s a "quoted" clip.mp4', _small("smptebars", "320x180", 25, 1.5), h264),
        "name_unicode": _Clip("vidéo_日本語_клип.mp4", _small("rgbtestsrc", "320x180", 25, 2), h264),
    }


def generate_bad_videos(dest: Path) -> dict[str, Path]:
    """Write the edge-case inputs an ingestion must survive into dest; return {short name: path}.

    Idempotent like generate_videos: files already present are kept.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    zero = dest / "zero_byte.mp4"
    if not zero.exists():
        zero.touch()
    out["zero_byte"] = zero

    text = dest / "text_as.mp4"
    if not text.exists():
        text.write_text("This is not a video. It is plain text with a .mp4 name.\n", encoding="utf-8")
    out["text_as_mp4"] = text

    # Both truncations start from the same 2 s clip. Without +faststart the mp4 muxer writes moov after the
    # media data, so the first 40% has no index at all; with +faststart moov comes first and survives, so
    # the file probes as a 2 s clip whose frames run out part-way.
    for key, movflags in (("truncated", []), ("truncated_tail", ["-movflags", "+faststart"])):
        path = dest / f"{key}.mp4"
        if not path.exists():
            whole = dest / f".{key}.whole.mp4"
            clip = _Clip(whole.name, _small("testsrc2", "320x180", 25, 2), (*_H264, *movflags))
            try:
                _encode(clip, whole)
                _truncate_copy(whole, path, 0.4)
            finally:
                whole.unlink(missing_ok=True)
        out[key] = path

    dangling = dest / "dangling.mp4"
    if not os.path.lexists(dangling):
        # Relative target inside a directory that does not exist: stays dangling wherever dest is moved.
        os.symlink(os.path.join("no-such-directory", "missing.mp4"), dangling)
    out["unreadable"] = dangling

    for key, clip in _bad_clips().items():
        path = dest / clip.name
        if not path.exists():
            _encode(clip, path)
        out[key] = path

    rotated = dest / "rotated_640x360_rot90.mp4"
    if not rotated.exists():
        # ffmpeg 5.1 has no -display_rotation input option (added in 6.0); its mp4 muxer still turns a
        # stream tag "rotate" into a display matrix, so tag the stream while remuxing an upright clip.
        upright = dest / ".rotated.upright.mp4"
        partial = _partial_path(rotated)
        try:
            _encode(_Clip(upright.name, _small("testsrc2", "640x360", 25, 2), tuple(_H264)), upright)
            _run_ffmpeg(
                [
                    "-i",
                    str(upright),
                    "-map",
                    "0",
                    "-c",
                    "copy",
                    "-metadata:s:v:0",
                    "rotate=90",
                    *_DETERMINISTIC,
                    str(partial),
                ],
                rotated.name,
            )
            os.replace(partial, rotated)
        finally:
            upright.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    out["rotated"] = rotated
    return out


# ====================================================================== verifiable task clips

# The colours the task clips show, by the word a question and an answer use for them (ffmpeg hex colours).
TASK_SHOT_COLOURS: dict[str, str] = {
    "red": "0xDC1E1E",
    "green": "0x1EA03C",
    "blue": "0x283CDC",
    "yellow": "0xE6C81E",
    "white": "0xF0F0F0",
}


def colour_shots_clip(
    colours: list[str], path: Path, size: int = 48, rate: int = 4, shot_s: float = 1.0
) -> Path:
    """Encode a clip of flat colour shots, one per word of ``colours`` in that order, each ``shot_s`` seconds,
    ``size`` pixels square (MPEG-4 part 2 in MP4, every frame a keyframe so no shot bleeds into the next)."""
    path = Path(path)
    sources = ";".join(
        f"color=c={TASK_SHOT_COLOURS[c]}:s={size}x{size}:r={rate}:d={shot_s},setsar=1[s{k}]"
        for k, c in enumerate(colours)
    )
    inputs = "".join(f"[s{k}]" for k in range(len(colours)))
    graph = f"{sources};{inputs}concat=n={len(colours)}:v=1:a=0,format=yuv420p[v]"
    codec = ("-c:v", "mpeg4", "-q:v", "4", "-g", "1", "-pix_fmt", "yuv420p")
    _encode(_Clip(path.name, graph, codec), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyeflow.synthetic.videos",
        description="Write sample videos to DEST and edge-case inputs to DEST/bad, with ffmpeg only.",
    )
    parser.add_argument("dest", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="re-encode sample videos that exist")
    args = parser.parse_args(argv)
    for path in generate_videos(args.dest, overwrite=args.overwrite):
        print(f"{path.stat().st_size:>9}  {path}")
    for key, path in generate_bad_videos(args.dest / "bad").items():
        size = path.stat().st_size if path.exists() else "-"
        print(f"{size:>9}  {path}  ({key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
