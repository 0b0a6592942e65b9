"""Decoding above the back-ends: which decoder reads a file, and what a sample's media decode to.

`media.py` is the contract the back-ends share; this module is the one that imports them
(`decode_pyav`, `decode_torchcodec`, `decode_decord`, and `dali_pipelines` on first use, since it
needs DALI installed) and picks one per file. In a `cpu` run each step uses the fastest installed
decoder that reads the file (:data:`FRAME_DECODERS`, :data:`AUDIO_DECODERS`, measured in
bench/RESULTS.md), PyAV last, and a clip's frames and own audio track come from one pass over the
file. `DecodeSettings` (T, K, S, rate, window, back-end) is what the data code receives instead of
the model config; `load_media` / `load_media_batch` decode what a sample's tokens ask for.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from nemo_avllm.data import decode_decord, decode_pyav, decode_torchcodec
from nemo_avllm.data.index import MediaIndex
from nemo_avllm.data.manifest import Sample
from nemo_avllm.media import (
    CLAP_WINDOW,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_NUM_SEGMENTS,
    SAMPLE_RATE,
    DecodedClip,
    MediaError,
    MediaInfo,
    audio_segments,
    backend_label,
    cuda_available,
    dali_reads_audio,
    dali_reads_video,
    normalize_frames,
    resolve_backend,
    sample_frame_indices,
)

# --------------------------------------------------------------------------------------------
# Which decoder reads a file
# --------------------------------------------------------------------------------------------

# The back-ends; each has `available()`; frame decoders `read_frames(path, T, info)`, audio
# decoders `read_audio(path, sample_rate)` (see decode_pyav.py for the reference).
BACKENDS = ("pyav", "torchcodec", "decord", "dali")
_MODULES = {"pyav": decode_pyav, "torchcodec": decode_torchcodec, "decord": decode_decord}
# Fastest first, as measured (bench/RESULTS.md, "Decode back-ends"); PyAV reads what the others
# cannot, so a list ends with it. Frames: PyAV, which skips the frames nothing refers to
# (decode_pyav._decode_skipping); torchcodec and decord return the same bytes but decode every
# frame, slower here (pass `decoders=` to use them). Audio: torchcodec on FLAC/WAV side-cars.
FRAME_DECODERS = ("pyav",)
AUDIO_DECODERS = ("torchcodec", "pyav")


def backend_module(name: str):
    """The back-end module `name`; DALI's is imported on first use (it needs nvidia-dali)."""
    if name == "dali":
        import dali_pipelines

        return dali_pipelines
    if name not in _MODULES:
        raise ValueError(f"unknown decode back-end {name!r}; expected one of {sorted(BACKENDS)}")
    return _MODULES[name]


def installed(name: str) -> bool:
    """True when back-end `name`'s library imports here."""
    try:
        return bool(backend_module(name).available())
    except ImportError:
        return False


def read_video_frames(path, num_frames: int = DEFAULT_NUM_FRAMES, info: MediaInfo | None = None,
                      decoders: tuple[str, ...] = FRAME_DECODERS) -> tuple[np.ndarray, list[int], int]:
    """T sampled frames, upright uint8 `[T, H, W, 3]` (libswscale pixels), from the first of
    `decoders` that is installed and reads the file; PyAV decides what is unreadable.
    Returns (frames, frame indices, frames in the video)."""
    for name in decoders:
        if name == "pyav":
            return decode_pyav.decode_video_frames(path, num_frames)
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
            return decode_pyav.decode_audio(path, sample_rate)
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
        return decode_pyav.read_clip(video_path, num_frames, sample_rate)
    frames, indices, n = read_video_frames(video_path, num_frames, info)
    return frames, indices, n, read_audio(video_path if audio_path is None else audio_path, sample_rate)


def decode_video(
    path, num_frames: int = DEFAULT_NUM_FRAMES, image_size: int = DEFAULT_IMAGE_SIZE, info: MediaInfo | None = None
) -> tuple[torch.Tensor, list[int], int]:
    """CPU run's video: `[T, 3, S, S]` float32, frame indices, frames in the video."""
    frames, indices, n = read_video_frames(path, num_frames, info)
    return normalize_frames(frames, image_size), indices, n


def load_audio_segments(path, num_segments: int = DEFAULT_NUM_SEGMENTS, sample_rate: int = SAMPLE_RATE,
                        window: int = CLAP_WINDOW) -> torch.Tensor | None:
    """CPU run's audio: `[K, W]` float32, or None without audio."""
    return audio_segments(read_audio(path, sample_rate), num_segments, window)


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
        meta = info if info is not None else decode_pyav.probe(video_path)
        if dali_reads_video(meta, device):
            indices = sample_frame_indices(meta.num_frames, num_frames)
            video = dali.decode_video_dali(video_path, indices, meta.rotation, image_size, device)
            n = meta.num_frames
        else:
            frames, indices, n = decode_pyav.decode_video_frames(video_path, num_frames, pixels="dali")
            video = dali.normalize_frames_dali(frames, image_size, device)
        wave = dali.decode_audio_dali(audio_src, sample_rate) if dali_reads_audio(audio_src) else read_audio(
            audio_src, sample_rate)
    else:
        frames, indices, n, wave = read_frames_and_audio(video_path, audio_path, num_frames, sample_rate, info)
        video = normalize_frames(frames, image_size)
    audio = audio_segments(wave, num_segments, window)
    return DecodedClip(video, audio, indices, n, audio is not None, backend=backend_label(run))


# --------------------------------------------------------------------------------------------
# What a sample's media decode to
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """Decode parameters, made from the model config outside `data/` (`training.data.decode_settings`)
    so the data always fits the encoders (T frames of S px, K CLAP windows of W samples at the
    encoder's rate). `backend` is resolved once per run (`media.resolve_backend`)."""

    num_frames: int  # T
    num_audio_segments: int  # K
    image_size: int  # S
    sample_rate: int
    window: int  # W: samples per audio segment
    backend: str = "cpu"  # cpu | dali | auto (see decode_clip)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MediaSource:
    """Where one clip's pixels and sound are read from (the FLAC side-car when prepared)."""

    media_id: str
    video: str
    audio: str  # file to read audio from: side-car FLAC, the manifest's audio file, or the video
    has_audio: bool | None
    info: MediaInfo | None = None

    @classmethod
    def of(cls, sample: Sample, index: MediaIndex | None = None) -> "MediaSource":
        return cls.lookup(sample.media_id, sample.video, sample.audio, sample.has_audio, index)

    @classmethod
    def lookup(cls, media_id: str, video: str, audio: str | None, has_audio: bool | None,
               index: MediaIndex | None = None) -> "MediaSource":
        """The prepare index's record when it has one (side-car FLAC, probe), else the files."""
        rec = index.get(media_id) if index is not None else None
        if rec is not None:
            return cls.of_record(rec)
        return cls(media_id, video, audio or video, has_audio)

    @classmethod
    def of_record(cls, rec: dict) -> "MediaSource":
        """From a prepare index record (what `features` iterates over without a manifest)."""
        audio = rec.get("flac") or rec.get("audio_path") or rec["path"]
        return cls(rec["id"], rec["path"], audio, bool(rec.get("has_audio")), MediaInfo.from_dict(rec))


def load_media(src: MediaSource, s: DecodeSettings, video: bool, audio: bool):
    """(video [T,3,S,S] | None, audio [K,W] | None). Raises MediaError for undecodable files and
    when audio is asked for but the clip has none."""
    v = a = None
    if video and (audio or s.backend != "cpu"):  # a DALI run decodes the pair in one pipeline
        clip = decode_clip(src.video, src.audio, s.num_frames, s.num_audio_segments, s.image_size,
                           s.sample_rate, s.window, backend=s.backend, info=src.info)
        v, a = clip.video, clip.audio
    elif video:
        v, _, _ = decode_video(src.video, s.num_frames, s.image_size, info=src.info)
    elif audio:
        a = load_audio_segments(src.audio, s.num_audio_segments, s.sample_rate, s.window)
    if audio and a is None:
        raise MediaError(src.audio, "no audio track, but the sample's tokens ask for audio")
    return v, a if audio else None


_BATCH_DECODERS: dict = {}


def load_media_batch(sources: Sequence[MediaSource], s: DecodeSettings, audio: Sequence[bool]) -> list:
    """`load_media(video=True)` for several clips: per clip (video, audio) or the MediaError.

    In a DALI run the videos DALI reads go through one batched `VideoBatchDecoder` call (NVDEC on
    a GPU); still images and codecs it lacks take the per-clip path. Audio comes from
    `load_media` (the FLAC side-car)."""
    out: list = [None] * len(sources)
    batched = []
    if s.backend != "cpu":
        device = "gpu" if cuda_available() else "cpu"
        for i, src in enumerate(sources):
            try:
                info = src.info or decode_pyav.probe(src.video)
            except MediaError as e:
                out[i] = e
                continue
            if dali_reads_video(info, device):
                batched.append((i, info))
    if batched:
        from dali_pipelines.video import VideoBatchDecoder

        key = (len(sources), s.image_size, device)
        if key not in _BATCH_DECODERS:
            _BATCH_DECODERS[key] = VideoBatchDecoder(len(sources), image_size=s.image_size, device=device)
        items = [(sources[i].video, sample_frame_indices(info.num_frames, s.num_frames), info.rotation)
                 for i, info in batched]
        video, ok = _BATCH_DECODERS[key].decode(items)
        for k, (i, _) in enumerate(batched):
            if not ok[k]:
                out[i] = MediaError(sources[i].video, f"DALI ({device}) could not decode it")
                continue
            try:
                out[i] = (video[k], load_media(sources[i], s, video=False, audio=audio[i])[1])
            except MediaError as e:
                out[i] = e
    for i, src in enumerate(sources):
        if out[i] is None:
            try:
                out[i] = load_media(src, s, video=True, audio=audio[i])
            except MediaError as e:
                out[i] = e
    return out
