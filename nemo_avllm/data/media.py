"""The decoding contract: what every back-end returns, and which back-end a run uses.

Back-ends are siblings that import this module (never the reverse, except through
:func:`backend_module`, the one place that loads them): `decode_pyav.py` (reads everything;
the fallback), `decode_torchcodec.py`, `decode_decord.py` (faster where installed and able to
read the file) and `dali_pipelines/` (DALI, GPU nodes). Contract (DESIGN.md §3):

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
In a `cpu` run each step uses the fastest installed decoder that reads the file
(:data:`FRAME_DECODERS`, :data:`AUDIO_DECODERS`, measured in bench/RESULTS.md), PyAV last, and
a clip's frames and own audio track come from one pass over the file.
"""

from __future__ import annotations

import importlib
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
# What DALI's `fn.decoders.video` reads (NOTES.md; DALI 2.4 docstring).
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
# Back-ends: the one place that loads them
# --------------------------------------------------------------------------------------------

# module of each back-end; each has `available()`; frame decoders `read_frames(path, T, info)`,
# audio decoders `read_audio(path, sample_rate)` (see decode_pyav.py for the reference).
BACKEND_MODULES = {
    "pyav": "nemo_avllm.data.decode_pyav",
    "torchcodec": "nemo_avllm.data.decode_torchcodec",
    "decord": "nemo_avllm.data.decode_decord",
    "dali": "dali_pipelines",
}
# Fastest first, as measured (bench/RESULTS.md, "Decode back-ends"); PyAV reads what the others
# cannot, so a list ends with it. Frames: PyAV, which skips the frames nothing refers to
# (decode_pyav._decode_skipping); torchcodec and decord return the same bytes but decode every
# frame, slower here (pass `decoders=` to use them). Audio: torchcodec on FLAC/WAV side-cars.
FRAME_DECODERS = ("pyav",)
AUDIO_DECODERS = ("torchcodec", "pyav")

# PyAV names that other files import from here (kept for them; defined in decode_pyav.py).
_PYAV_NAMES = frozenset({"probe", "probe_audio", "decode_audio", "iter_audio", "decode_video_frames"})


def backend_module(name: str):
    """The back-end module `name` (imported on first use, so this module imports none of them)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown decode back-end {name!r}; expected one of {sorted(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def installed(name: str) -> bool:
    """True when back-end `name`'s library imports here."""
    try:
        return bool(backend_module(name).available())
    except ImportError:
        return False


def __getattr__(name: str):
    if name in _PYAV_NAMES:
        return getattr(backend_module("pyav"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_video_frames(path, num_frames: int = DEFAULT_NUM_FRAMES, info: MediaInfo | None = None,
                      decoders: tuple[str, ...] = FRAME_DECODERS) -> tuple[np.ndarray, list[int], int]:
    """T sampled frames, upright uint8 `[T, H, W, 3]` (libswscale pixels), from the first of
    `decoders` that is installed and reads the file; PyAV decides what is unreadable.
    Returns (frames, frame indices, frames in the video)."""
    for name in decoders:
        if name == "pyav":
            return backend_module("pyav").decode_video_frames(path, num_frames)
        if info is None or info.is_image or not installed(name):
            continue  # the faster decoders need the probe's frame count, and read no stills
        try:
            return backend_module(name).read_frames(path, num_frames, info)
        except Exception:  # noqa: BLE001 - a codec or file it cannot read: the next decoder
            continue
    raise ValueError(f"no frame decoder among {decoders} read {path}; add 'pyav' (reads every codec)")


def read_audio(path, sample_rate: int = SAMPLE_RATE, decoders: tuple[str, ...] = AUDIO_DECODERS) -> np.ndarray | None:
    """Whole track → mono float32 at `sample_rate` (mean of the channels), or None without audio,
    from the first of `decoders` that is installed and reads it (PyAV last)."""
    for name in decoders:
        if name == "pyav":
            return backend_module("pyav").decode_audio(path, sample_rate)
        if not installed(name):
            continue
        try:
            return backend_module(name).read_audio(path, sample_rate)
        except Exception:  # noqa: BLE001 - e.g. no audio stream: PyAV answers
            continue
    raise ValueError(f"no audio decoder among {decoders} read {path}; add 'pyav' (reads every codec)")


def read_frames_and_audio(video_path, audio_path, num_frames: int, sample_rate: int, info: MediaInfo | None = None):
    """A cpu run's frames (:func:`read_video_frames`) and audio (:func:`read_audio`) of one clip:
    (frames, indices, frames in the video, wave or None). When the audio is the video's own track
    and PyAV reads the frames, both come from one open and one demuxing pass (`read_clip`)."""
    same_file = audio_path is None or os.fspath(audio_path) == os.fspath(video_path)
    if same_file and FRAME_DECODERS[0] == "pyav":
        return backend_module("pyav").read_clip(video_path, num_frames, sample_rate)
    frames, indices, n = read_video_frames(video_path, num_frames, info)
    return frames, indices, n, read_audio(video_path if audio_path is None else audio_path, sample_rate)


def decode_video(
    path, num_frames: int = DEFAULT_NUM_FRAMES, image_size: int = DEFAULT_IMAGE_SIZE, info: MediaInfo | None = None
) -> tuple[torch.Tensor, list[int], int]:
    """CPU run's video: `[T, 3, S, S]` float32, frame indices, frames in the video."""
    frames, indices, n = read_video_frames(path, num_frames, info)
    return normalize_frames(frames, image_size), indices, n


def load_audio_segments(
    path,
    num_segments: int = DEFAULT_NUM_SEGMENTS,
    sample_rate: int = SAMPLE_RATE,
    window: int = CLAP_WINDOW,
) -> torch.Tensor | None:
    """CPU run's audio: `[K, W]` float32, or None without audio."""
    wave = read_audio(path, sample_rate)
    if wave is None or wave.size == 0:
        return None
    return torch.from_numpy(segment_audio(wave, num_segments, window))


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
    `dali-gpu` / `dali-cpu` (DALI's pixels and resize; README "Known limits" gives the gap)."""
    backend = resolve_backend(backend)
    if backend == "cpu":
        return "cpu"
    return "dali-gpu" if cuda_available() else "dali-cpu"


def backend_mismatch(recorded: str | None, label: str, where) -> str | None:
    """Why `label`-decoded data may not join `where`, which holds `recorded`-decoded data (None
    when it may): the back-ends' pixels differ (README "Known limits"), so a cache holds one."""
    if recorded is None or recorded == label:
        return None
    return (f"{where} was decoded with back-end {recorded!r}, this run decodes with {label!r}; their pixels "
            f"differ, so one cache holds one back-end: set model.data.decode_backend to the cache's "
            f"({'cpu' if recorded == 'cpu' else 'dali'}) or choose another data.feature_cache folder")


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
    "cpu", "dali" (GPU if CUDA is present, else DALI's CPU operators) or "auto" (see
    :func:`resolve_backend`). `info` (from the prepare index) saves a probe. Raises MediaError
    for files that cannot be decoded.
    """
    run = resolve_backend(backend)
    audio_src = audio_path if audio_path is not None else video_path
    if run == "dali":
        dali = backend_module("dali")
        device = "gpu" if cuda_available() else "cpu"
        meta = info if info is not None else backend_module("pyav").probe(video_path)
        if dali_reads_video(meta, device):
            indices = sample_frame_indices(meta.num_frames, num_frames)
            video = dali.decode_video_dali(video_path, indices, meta.rotation, image_size, device)
            n = meta.num_frames
        else:
            frames, indices, n = backend_module("pyav").decode_video_frames(video_path, num_frames, pixels="dali")
            video = dali.normalize_frames_dali(frames, image_size, device)
        wave = dali.decode_audio_dali(audio_src, sample_rate) if dali_reads_audio(audio_src) else read_audio(
            audio_src, sample_rate)
    else:
        frames, indices, n, wave = read_frames_and_audio(video_path, audio_path, num_frames, sample_rate, info)
        video = normalize_frames(frames, image_size)
    audio = None
    if wave is not None and wave.size > 0:
        audio = torch.from_numpy(segment_audio(wave, num_segments, window))
    return DecodedClip(video, audio, indices, n, audio is not None, backend=backend_label(run))
