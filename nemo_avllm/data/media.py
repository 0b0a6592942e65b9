"""Media decoding: the output contract shared by both back-ends, and the CPU back-end (PyAV).

Contract (DESIGN.md §3), identical for the CPU back-end here and the DALI pipelines in
`dali_pipelines/`:

- frames are sampled uniformly, `round(linspace(0, n-1, T))` (:func:`sample_frame_indices`);
- each frame is turned upright (display-matrix rotation; JPEG EXIF orientation, which FFmpeg
  reports the same way; mirror flips are ignored), resized so its short side is `S`
  (bicubic, antialiased; long side `floor(x + 0.5)`), centre-cropped to `S x S` (offset
  `(d + 1) // 2`, DALI's rounding), scaled to [0, 1] and normalised with the CLIP mean/std →
  float32 `[T, 3, S, S]`;
- audio is the whole track, mono (mean of the channels), 48 kHz, cut into K equal consecutive
  segments, each repeat-padded or centre-cropped to the CLAP window → float32 `[K, W]`
  (:func:`segment_audio`, used by both back-ends).

The CPU back-end seeks with a packet index built by demuxing (no decoding), so only the GOPs that
hold the wanted frames are decoded, and it falls back to a plain sequential decode when a file's
timestamps can't be trusted.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Constants of the contract
# --------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLE_RATE = 48_000  # CLAP's input rate
CLAP_WINDOW = 480_000  # 10 s at 48 kHz: one CLAP window per audio segment
DEFAULT_NUM_FRAMES = 32  # T (paper §3.1)
DEFAULT_NUM_SEGMENTS = 4  # K
DEFAULT_IMAGE_SIZE = 224
RESIZE_INTERPOLATION = "bicubic"  # antialiased; DALI: INTERP_CUBIC + antialias

# libavformat demuxers that hold one still image (a still is a 1-frame video).
IMAGE_DEMUXERS = frozenset(
    {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "gif", "gif_pipe"}
)
# What DALI's `fn.decoders.video` reads (NOTES.md; DALI 2.4 docstring).
DALI_CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_VIDEO_CODECS = DALI_CPU_VIDEO_CODECS | {"h264", "hevc", "av1", "mpeg4"}
# What DALI's `fn.decoders.audio` reads: WAV, FLAC and OGG (Vorbis/Opus) *files*.
DALI_AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus"})

_FIX_HINT = (
    "Check the file, re-encode it (e.g. `ffmpeg -i IN -c:v libx264 -c:a aac OUT.mp4`) or drop it "
    "from the manifest; `avllm prepare` lists such files in bad_files.jsonl and excludes them"
)


class MediaError(RuntimeError):
    """A media file that cannot be decoded (missing, corrupt, truncated, no video stream).

    Data loaders catch it, skip the sample and count it; `prepare` records it in bad_files.jsonl.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason.rstrip('. ')}. {_FIX_HINT}.")

    def __reduce__(self):  # picklable across worker processes
        return (MediaError, (self.path, self.reason))


# --------------------------------------------------------------------------------------------
# Shared helpers (both back-ends)
# --------------------------------------------------------------------------------------------


def sample_frame_indices(num_frames_in_video: int, T: int) -> list[int]:
    """Uniform frame sampling `round(linspace(0, n-1, T))`; fewer frames than T repeat indices."""
    if num_frames_in_video < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames_in_video}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return [int(i) for i in np.round(np.linspace(0, num_frames_in_video - 1, T))]


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to `size`, long side rounded half up (as DALI does)."""
    if height <= width:
        return size, max(size, int(math.floor(width * size / height + 0.5)))
    return max(size, int(math.floor(height * size / width + 0.5))), size


def crop_offset(length: int, size: int) -> int:
    """Start of a centred crop of `size` out of `length`; rounds half up like DALI's crop_pos=0.5."""
    return (length - size + 1) // 2


def rotate_upright(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Turn `[T, H, W, C]` frames upright; `rotation` is the display matrix's counter-clockwise
    angle in degrees (PyAV's `VideoFrame.rotation`, ffprobe's `rotation`)."""
    k = (int(round(rotation / 90.0)) % 4) if rotation else 0
    return np.rot90(frames, k=k, axes=(1, 2)) if k else frames


def normalize_frames(frames: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` (upright) → CLIP-normalised float32 `[T, 3, S, S]`."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    # NHWC memory seen as NCHW is channels-last: torch's uint8 antialiased resize kernel, ~30x
    # faster than float, and it rounds/saturates to 8 bits like DALI and PIL do.
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    rh, rw = resized_shape(h, w, image_size)
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
    top, left = crop_offset(rh, image_size), crop_offset(rw, image_size)
    x = x[:, :, top : top + image_size, left : left + image_size].contiguous().float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def segment_audio(
    wave: np.ndarray, num_segments: int = DEFAULT_NUM_SEGMENTS, window: int = CLAP_WINDOW
) -> np.ndarray:
    """Mono waveform → `[K, W]`: K equal consecutive segments covering the whole track; a segment
    shorter than W is tiled then cut to W, a longer one is centre-cropped to W."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n = wave.shape[0]
    if n == 0:
        raise ValueError("cannot segment an empty waveform")
    if num_segments < 1 or window < 1:
        raise ValueError(f"num_segments and window must be >= 1, got {num_segments}, {window}")
    out = np.empty((num_segments, window), dtype=np.float32)
    for k in range(num_segments):
        start, end = k * n // num_segments, (k + 1) * n // num_segments
        seg = wave[start:end] if end > start else wave[min(start, n - 1) : min(start, n - 1) + 1]
        if seg.shape[0] >= window:
            off = (seg.shape[0] - window) // 2
            out[k] = seg[off : off + window]
        else:
            reps = -(-window // seg.shape[0])
            out[k] = np.tile(seg, reps)[:window]
    return out


def cuda_available() -> bool:
    return torch.cuda.is_available()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaInfo:
    """What `prepare` records per video (one probe; no pixel decoding beyond the first frame).

    `width`/`height` are the stored (coded) size; `rotation` (counter-clockwise degrees) says how
    to turn it upright. `num_frames` counts demuxed video packets (one per frame) that are shown
    (edit-list discards excluded), which is exact for variable-frame-rate files and files whose
    header says 0 frames.
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int
    video_codec: str
    container: str
    is_image: bool
    has_audio: bool
    audio_channels: int = 0
    audio_sample_rate: int = 0
    audio_codec: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MediaInfo":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d})


@dataclass
class _FrameIndex:
    """Presentation-ordered packet timestamps of the video stream (from demuxing only)."""

    pts: list[int | None]
    keyframe: list[bool]
    end_pts: int | None = None  # pts + duration of the last frame, for the duration

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def seekable(self) -> bool:
        """Frames can be found by pts only if every packet has a unique pts."""
        return bool(self.pts) and None not in self.pts and len(set(self.pts)) == len(self.pts)


def _open(path) -> av.container.InputContainer:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise MediaError(p, "file not found")
    try:
        return av.open(p, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise MediaError(p, f"not a readable media file ({e})") from e


def _video_stream(container, path):
    if not container.streams.video:
        raise MediaError(path, "no video stream")
    return container.streams.video[0]


def _scan_video(container, stream, path) -> _FrameIndex:
    """Demux (don't decode) the video stream: one packet per frame → exact count and pts index."""
    rows: list[tuple[int | None, bool]] = []
    end_pts = None
    packets = 0
    try:
        for pkt in container.demux(stream):
            if pkt.size == 0:  # the flush packet at EOF
                continue
            packets += 1
            if pkt.is_discard:  # before an edit list's start (trimmed mp4): decoded, never shown
                continue
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            rows.append((ts, bool(pkt.is_keyframe)))
            if ts is not None and pkt.duration:
                end = ts + pkt.duration
                end_pts = end if end_pts is None else max(end_pts, end)
    except av.FFmpegError as e:
        raise MediaError(path, f"demuxing failed after {packets} video packets ({e})") from e
    if not rows:
        raise MediaError(path, "the video stream has no frames")
    declared = stream.frames or 0
    if container.format.name.split(",")[0] in ("mov", "mp4") and declared > packets:
        # mp4/mov headers list every sample; fewer packets on disk means the file was cut short.
        raise MediaError(path, f"truncated: the header lists {declared} frames, {packets} are on disk")
    if all(r[0] is not None for r in rows):
        rows.sort(key=lambda r: r[0])
    return _FrameIndex([r[0] for r in rows], [r[1] for r in rows], end_pts)


def _is_image(container) -> bool:
    return any(name in IMAGE_DEMUXERS for name in container.format.name.split(","))


def probe(path) -> MediaInfo:
    """Probe a video (or still image) once: frame count, fps, duration, size, rotation, audio."""
    p = os.fspath(path)
    with _open(p) as c:
        vs = _video_stream(c, p)
        index = _scan_video(c, vs, p)
        rotation = 0
        try:
            c.seek(0)
            for frame in c.decode(vs):  # one frame: rotation lives in frame side data
                rotation = int(frame.rotation or 0)
                break
            else:
                raise MediaError(p, "no decodable video frame")
        except av.FFmpegError as e:
            raise MediaError(p, f"decoding the first frame failed ({e})") from e
        tb = vs.time_base
        is_image = _is_image(c)
        duration = 0.0
        if index.seekable and tb is not None and index.num_frames > 1:
            end = index.end_pts if index.end_pts is not None else index.pts[-1]
            duration = float((end - index.pts[0]) * tb)
        if duration <= 0 and c.duration and not is_image:
            duration = c.duration / av.time_base
        fps = index.num_frames / duration if duration > 0 else 0.0
        return MediaInfo(
            path=p,
            num_frames=index.num_frames,
            fps=round(fps, 6),
            duration=round(duration, 6),
            width=int(vs.codec_context.width),
            height=int(vs.codec_context.height),
            rotation=rotation % 360,
            video_codec=vs.codec_context.name,
            container=c.format.name,
            is_image=bool(is_image),
            has_audio=bool(c.streams.audio),
            **_audio_fields(c),
        )


def _audio_fields(container) -> dict:
    if not container.streams.audio:
        return {"audio_channels": 0, "audio_sample_rate": 0, "audio_codec": None}
    cc = container.streams.audio[0].codec_context
    return {"audio_channels": int(cc.channels), "audio_sample_rate": int(cc.sample_rate or 0), "audio_codec": cc.name}


def probe_audio(path) -> dict | None:
    """Channels, rate and codec of a file's first audio stream (None without one), for a
    manifest's separate `audio` file."""
    with _open(path) as c:
        return _audio_fields(c) if c.streams.audio else None


# --------------------------------------------------------------------------------------------
# CPU back-end: video
# --------------------------------------------------------------------------------------------


def _decode_seek(container, stream, index: _FrameIndex, wanted: list[int]) -> dict[int, "av.VideoFrame"] | None:
    """Decode the `wanted` presentation indices, seeking to the keyframe before a wanted frame
    whenever a keyframe lies between the decoder's position and that frame. Returns None when
    the stream doesn't behave (frame missing or without pts): the caller decodes sequentially."""
    key_before, last_key = [], 0
    for i, k in enumerate(index.keyframe):
        last_key = i if k else last_key
        key_before.append(last_key)
    got: dict[int, av.VideoFrame] = {}
    frames_iter, last_pts = None, None
    for t in wanted:
        target = index.pts[t]
        key = key_before[t]
        if frames_iter is None or (last_pts is not None and index.pts[key] > last_pts):
            if key > 0:
                container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
            else:
                container.seek(0)  # the index scan left the demuxer at EOF
            frames_iter = container.decode(stream)
            last_pts = None
        for frame in frames_iter:
            if frame.pts is None:
                return None
            last_pts = frame.pts
            if frame.pts == target:
                got[t] = frame
                break
            if frame.pts > target:
                return None  # the wanted frame was not produced by the decoder
        else:
            return None
    return got


def _decode_sequential(container, stream, wanted: set[int]) -> tuple[dict[int, "av.VideoFrame"], int]:
    """Decode every frame from the start, keep the wanted ones; also returns the decoded count."""
    container.seek(0)
    got, n = {}, 0
    for frame in container.decode(stream):
        if n in wanted:
            got[n] = frame
        n += 1
    return got, n


def decode_video_frames(path, num_frames: int = DEFAULT_NUM_FRAMES) -> tuple[np.ndarray, list[int], int]:
    """Decode T uniformly sampled frames, upright, as uint8 `[T, H, W, 3]` (CPU, PyAV).

    Returns (frames, frame indices, number of frames in the video).
    """
    p = os.fspath(path)
    with _open(p) as c:
        vs = _video_stream(c, p)
        vs.thread_type = "AUTO"
        try:
            index = _scan_video(c, vs, p)
            n = index.num_frames
            indices = sample_frame_indices(n, num_frames)
            wanted = sorted(set(indices))
            got = _decode_seek(c, vs, index, wanted) if index.seekable else None
            if got is None:
                got, decoded = _decode_sequential(c, vs, set(wanted))
                if decoded == 0:
                    raise MediaError(p, "no decodable video frame")
                if decoded < n:  # the decoder dropped packets: sample over what really decodes
                    n = decoded
                    indices = sample_frame_indices(n, num_frames)
                    got, _ = _decode_sequential(c, vs, set(indices))
            rgb = {i: f.to_ndarray(format="rgb24") for i, f in got.items()}
            rotation = int(got[indices[0]].rotation or 0)  # display matrix / JPEG EXIF orientation
        except av.FFmpegError as e:
            raise MediaError(p, f"video decoding failed ({e})") from e
    frames = np.stack([rgb[i] for i in indices])
    return rotate_upright(frames, rotation), indices, n


def decode_video(
    path, num_frames: int = DEFAULT_NUM_FRAMES, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[torch.Tensor, list[int], int]:
    """CPU back-end video: `[T, 3, S, S]` float32, frame indices, frames in the video."""
    frames, indices, n = decode_video_frames(path, num_frames)
    return normalize_frames(frames, image_size), indices, n


# --------------------------------------------------------------------------------------------
# CPU back-end: audio
# --------------------------------------------------------------------------------------------


def iter_audio(path, sample_rate: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """The audio track as mono float32 chunks at `sample_rate` (mean of the channels), frame by
    frame, so a long track is never held whole (`prepare` streams it into the FLAC side-car).

    Nothing when the file has no audio stream. Resampling keeps the channels (libswresample, per
    channel) and averages afterwards, so the downmix is a plain mean rather than ffmpeg's surround
    downmix matrix.
    """
    p = os.fspath(path)
    with _open(p) as c:
        if not c.streams.audio:
            return
        stream = c.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
        try:
            for frame in c.decode(stream):
                frame.pts = None  # resample by sample count, immune to timestamp gaps
                yield from (f.to_ndarray().mean(axis=0) for f in resampler.resample(frame))
            yield from (f.to_ndarray().mean(axis=0) for f in resampler.resample(None))
        except av.FFmpegError as e:
            raise MediaError(p, f"audio decoding failed ({e})") from e


def decode_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """Whole audio track → mono float32 at `sample_rate` (`iter_audio`, joined); None when the
    file has no audio stream or the stream holds no samples."""
    chunks = list(iter_audio(path, sample_rate))
    return np.concatenate(chunks) if chunks else None


def load_audio_segments(
    path,
    num_segments: int = DEFAULT_NUM_SEGMENTS,
    sample_rate: int = SAMPLE_RATE,
    window: int = CLAP_WINDOW,
) -> torch.Tensor | None:
    """CPU back-end audio: `[K, W]` float32, or None without audio."""
    wave = decode_audio(path, sample_rate)
    if wave is None or wave.size == 0:
        return None
    return torch.from_numpy(segment_audio(wave, num_segments, window))


# --------------------------------------------------------------------------------------------
# One clip, either back-end
# --------------------------------------------------------------------------------------------


@dataclass
class DecodedClip:
    """One clip in the contract's shapes. `audio` is None when `has_audio` is False."""

    video: torch.Tensor  # [T, 3, S, S] float32
    audio: torch.Tensor | None  # [K, W] float32
    frame_indices: list[int]
    num_frames: int  # frames in the video file
    has_audio: bool
    backend: str = field(default="cpu")


def dali_reads_video(info: MediaInfo, device: str) -> bool:
    """True when DALI's video decoder handles this file on `device` ("cpu" or "gpu")."""
    if info.is_image:
        return False
    codecs = DALI_GPU_VIDEO_CODECS if device == "gpu" else DALI_CPU_VIDEO_CODECS
    return info.video_codec in codecs


def dali_reads_audio(path) -> bool:
    return Path(os.fspath(path)).suffix.lower() in DALI_AUDIO_SUFFIXES


def resolve_backend(backend: str) -> str:
    """The run's decode back-end, decided once (main process, before workers start): `cpu`, or
    `dali` / `auto` when DALI is used. `auto` is DALI only with DALI installed and a CUDA device
    (NVDEC); it then still reads still images and codecs NVDEC lacks with the CPU decoder."""
    if backend not in ("auto", "cpu", "dali"):
        raise ValueError(f"decode backend must be 'auto', 'cpu' or 'dali', got {backend!r}")
    if backend == "dali" and not dali_available():
        raise RuntimeError("backend='dali' needs nvidia-dali (pip install nvidia-dali-cuda120)")
    if backend == "auto" and not (dali_available() and cuda_available()):
        return "cpu"
    return backend


def backend_label(backend: str) -> str:
    """What a resolved back-end decodes with, as recorded in the feature cache."""
    if backend == "cpu":
        return "cpu"
    dev = "gpu" if cuda_available() else "cpu"
    return f"dali-{dev}" + (" (cpu for images and codecs DALI lacks)" if backend == "auto" else "")


def _choose_backend(backend: str, info_fn) -> tuple[str, str | None]:
    """→ ("cpu", None) or ("dali", device)."""
    if backend == "cpu":
        return "cpu", None
    if backend not in ("auto", "dali"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'dali', got {backend!r}")
    device = "gpu" if cuda_available() else "cpu"
    if not dali_available():
        if backend == "dali":
            raise RuntimeError("backend='dali' needs nvidia-dali (pip install nvidia-dali-cuda120)")
        return "cpu", None
    if backend == "auto" and device != "gpu":
        return "cpu", None
    info = info_fn()
    if dali_reads_video(info, device):
        return "dali", device
    if backend == "dali":
        raise ValueError(
            f"DALI on {device} cannot decode {info.path} (codec {info.video_codec}"
            f"{', still image' if info.is_image else ''}); use backend='cpu' or 'auto'"
        )
    return "cpu", None


def decode_clip(
    video_path,
    audio_path=None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    num_segments: int = DEFAULT_NUM_SEGMENTS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    sample_rate: int = SAMPLE_RATE,
    window: int = CLAP_WINDOW,
    backend: str = "auto",
    info: MediaInfo | None = None,
) -> DecodedClip:
    """Decode one clip into the contract's tensors.

    `audio_path` (the FLAC side-car from `prepare`) replaces the container's audio. `backend`:
    "cpu" (PyAV), "dali" (GPU if CUDA is present, else DALI's CPU decoders, VP8/VP9/MJPEG only)
    or "auto" (DALI on a GPU when it can read the codec, else CPU). `info` (from the prepare
    index) saves a probe. Raises MediaError for files that cannot be decoded.
    """
    cached: list[MediaInfo] = [info] if info is not None else []

    def get_info() -> MediaInfo:
        if not cached:
            cached.append(probe(video_path))
        return cached[0]

    chosen, device = _choose_backend(backend, get_info)
    audio_src = audio_path if audio_path is not None else video_path
    if chosen == "dali":
        from dali_pipelines.video import decode_video_dali

        meta = get_info()
        indices = sample_frame_indices(meta.num_frames, num_frames)
        video = decode_video_dali(video_path, indices, rotation=meta.rotation, image_size=image_size, device=device)
        n = meta.num_frames
    else:
        video, indices, n = decode_video(video_path, num_frames, image_size)

    if chosen == "dali" and dali_reads_audio(audio_src):
        from dali_pipelines.audio import decode_audio_dali

        wave = decode_audio_dali(audio_src, sample_rate=sample_rate)
    else:
        wave = decode_audio(audio_src, sample_rate)
    audio = None
    if wave is not None and wave.size > 0:
        audio = torch.from_numpy(segment_audio(wave, num_segments, window))
    return DecodedClip(video, audio, indices, n, audio is not None, backend=chosen if device is None else f"dali-{device}")
