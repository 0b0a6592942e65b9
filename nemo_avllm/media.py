"""The decoding contract: what every back-end returns, and which back-end a run uses.

It sits at the top of the package (beside `modality.py`) because both `data/` and the top-level
`dali_pipelines/` build on it, and neither package imports the other back.

Back-ends are siblings that import this module and nothing imports back: `decode_pyav.py`
(reads everything; the fallback), `decode_torchcodec.py`, `decode_decord.py` (faster where
installed and able to read the file) and `dali_pipelines/` (DALI, GPU nodes); `data/decode.py`, above
them, picks one per file. Contract:

- frames are sampled uniformly, `round(linspace(0, n-1, T))` (:func:`sample_frame_indices`);
- each frame is turned upright (display-matrix rotation; JPEG EXIF orientation, which FFmpeg
  reports the same way; mirror flips are ignored), resized so its short side is `S`
  (bicubic, antialiased; long side `floor(x + 0.5)`), centre-cropped to `S x S` (offset
  `(d + 1) // 2`, DALI's rounding), scaled to [0, 1] and normalised with the CLIP mean/std →
  float32 `[T, 3, S, S]`;
- audio is the whole track, mono (mean of the channels), 48 kHz, cut into K equal consecutive
  segments, each repeat-padded or centre-cropped to the CLAP window → float32 `[K, W]`
  (:func:`segment_audio`, used by every back-end);
- pixels come from one of two YUV→RGB conventions (:data:`PIXEL_CONVENTIONS`), fixed per run:
  `swscale` (libswscale's default: chroma point-sampled; PyAV, torchcodec and decord return the
  same bytes) in a CPU run, `dali` (chroma bilinear, :func:`yuv420_to_rgb`) in a DALI run.

One back-end per run: :func:`resolve_backend` decides `cpu` or `dali` once, before workers
start; :func:`backend_label` is recorded in the feature cache, which refuses a second label.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
# What DALI's `fn.decoders.video` reads (DALI 2.4's documentation of the operator).
DALI_CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_VIDEO_CODECS = DALI_CPU_VIDEO_CODECS | {"h264", "hevc", "av1", "mpeg4"}
# What DALI's `fn.decoders.audio` reads: WAV, FLAC and OGG (Vorbis/Opus) *files*.
DALI_AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus"})
# YUV→RGB conventions: libswscale's default (CPU decoders) or DALI's (see yuv420_to_rgb).
PIXEL_CONVENTIONS = ("swscale", "dali")
# BT.601 limited range, the matrix libswscale and DALI use for untagged and BT.601 video.
_YUV_SCALE = 255.0 / 219.0, 255.0 / 224.0
_KR, _KB = 0.299, 0.114

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
# Shared helpers (every back-end)
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


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """8-bit 4:2:0 planes (`[T, H, W]`, `[T, h, w]` twice) → uint8 `[T, H, W, 3]` the way DALI's
    video decoder converts: chroma upsampled bilinearly (centre-sited: weights 3/4, 1/4, edges
    repeated), BT.601 limited range, rounded to nearest. libswscale's default instead repeats
    each chroma sample, which differs by up to 169/255 at sharp colour edges."""
    t, h, w = y.shape
    chroma = torch.stack([u, v], 1).float()
    chroma = F.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False).sub_(128.0)
    cb, cr = chroma[:, 0], chroma[:, 1]
    luma = y.float().sub_(16.0).mul_(_YUV_SCALE[0])
    kg, s = 1.0 - _KR - _KB, _YUV_SCALE[1]
    rgb = torch.empty((t, h, w, 3), dtype=torch.float32)
    torch.add(luma, cr, alpha=2 * (1 - _KR) * s, out=rgb[..., 0])
    torch.add(luma, cb, alpha=-2 * _KB * (1 - _KB) / kg * s, out=rgb[..., 1])
    rgb[..., 1].add_(cr, alpha=-2 * _KR * (1 - _KR) / kg * s)
    torch.add(luma, cb, alpha=2 * (1 - _KB) * s, out=rgb[..., 2])
    return rgb.round_().clamp_(0, 255).to(torch.uint8)


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


def audio_segments(wave: np.ndarray | None, num_segments: int, window: int) -> torch.Tensor | None:
    """A decoded track as the contract's `[K, W]` tensor (:func:`segment_audio`), or None when
    there is no sound (no track, or an empty one)."""
    if wave is None or wave.size == 0:
        return None
    return torch.from_numpy(segment_audio(wave, num_segments, window))


def decode_threads() -> int:
    """Threads a CPU decoder may use: as many as torch computes with, so one in a DataLoader
    worker (`workers.loader_worker_init`), where W workers then use W cores. On 360p clips one
    thread is also the fastest per clip; frame threading pays off from 1080p (bench/RESULTS.md)."""
    return max(1, torch.get_num_threads())


def cuda_available() -> bool:
    return torch.cuda.is_available()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# What a probe finds and what a clip decodes to
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
class DecodedClip:
    """One clip in the contract's shapes. `audio` is None when `has_audio` is False."""

    video: torch.Tensor  # [T, 3, S, S] float32
    audio: torch.Tensor | None  # [K, W] float32
    frame_indices: list[int]
    num_frames: int  # frames in the video file
    has_audio: bool
    backend: str = field(default="cpu")  # backend_label() of the run



# --------------------------------------------------------------------------------------------
# One back-end per run
# --------------------------------------------------------------------------------------------


def dali_reads_video(info: MediaInfo, device: str) -> bool:
    """True when DALI's video decoder handles this file on `device` ("cpu" or "gpu")."""
    if info.is_image:
        return False
    codecs = DALI_GPU_VIDEO_CODECS if device == "gpu" else DALI_CPU_VIDEO_CODECS
    return info.video_codec in codecs


def dali_reads_audio(path) -> bool:
    return Path(os.fspath(path)).suffix.lower() in DALI_AUDIO_SUFFIXES


def resolve_backend(backend: str) -> str:
    """The run's decode back-end, decided once (main process, before workers start): `cpu` or
    `dali`. `auto` is DALI only with DALI installed and a CUDA device (NVDEC); a DALI run still
    decodes still images and codecs DALI lacks with PyAV, converted to RGB the DALI way and
    resized by DALI, so every clip of the run gets the same preprocessing."""
    if backend not in ("auto", "cpu", "dali"):
        raise ValueError(f"decode backend must be 'auto', 'cpu' or 'dali', got {backend!r}")
    if backend == "dali" and not dali_available():
        raise RuntimeError("backend='dali' needs nvidia-dali (pip install nvidia-dali-cuda120)")
    if backend == "auto":
        return "dali" if dali_available() and cuda_available() else "cpu"
    return backend


def backend_label(backend: str) -> str:
    """What a run decodes with, as recorded in the feature cache: `cpu` (libswscale pixels) or
    `dali-gpu` / `dali-cpu` (DALI's pixels and resize; docs/limits.md gives the gap)."""
    backend = resolve_backend(backend)
    if backend == "cpu":
        return "cpu"
    return "dali-gpu" if cuda_available() else "dali-cpu"


def backend_mismatch(recorded: str | None, label: str, where) -> str | None:
    """Why `label`-decoded data may not join `where`, which holds `recorded`-decoded data (None
    when it may): the back-ends' pixels differ (docs/limits.md), so a cache holds one."""
    if recorded is None or recorded == label:
        return None
    return (f"{where} was decoded with back-end {recorded!r}, this run decodes with {label!r}; their pixels "
            f"differ, so one cache holds one back-end: set model.data.decode_backend to the cache's "
            f"({'cpu' if recorded == 'cpu' else 'dali'}) or choose another data.feature_cache folder")
