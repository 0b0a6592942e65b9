"""torchcodec back-end of the decoding contract (`media.py`): frames and audio, where installed.

torchcodec (pip `torchcodec`, extra `decoders`) wraps the system FFmpeg. Its RGB frames are
libswscale's, byte for byte what PyAV returns, but it decodes every frame, so PyAV (which skips
the frames nothing refers to) reads frames faster here; it reads FLAC side-cars faster than PyAV,
and a cpu run takes their audio from it (bench/RESULTS.md). Frames are sampled over the
probe's frame count (`MediaInfo`); a file whose count torchcodec sees differently (edit lists,
broken timestamps) is refused, so `decode.read_video_frames` falls back to PyAV. torchcodec turns
frames upright itself (display matrix), as the contract asks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nemo_avllm.media import MediaInfo, decode_threads, sample_frame_indices

NAME = "torchcodec"
# Lossless files only: on AAC torchcodec keeps the encoder's end padding (a 3 s track comes back
# 893 samples long at 48 kHz), which shifts the K segment boundaries; PyAV trims it. The FLAC
# side-cars that `prepare` writes decode bit-identically with both.
AUDIO_SUFFIXES = frozenset({".flac", ".wav"})


def available() -> bool:
    import torchcodec.decoders  # noqa: F401 - raises ImportError when absent or broken

    return True


def read_frames(path, num_frames: int, info: MediaInfo) -> tuple[np.ndarray, list[int], int]:
    """T frames sampled over `info.num_frames`, upright uint8 `[T, H, W, 3]`, indices, count."""
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(os.fspath(path), dimension_order="NHWC", seek_mode="exact", num_ffmpeg_threads=decode_threads())
    n = dec.metadata.num_frames
    if n != info.num_frames:
        raise ValueError(f"torchcodec counts {n} frames in {path}, the probe {info.num_frames}")
    indices = sample_frame_indices(n, num_frames)
    return dec.get_frames_at(indices).data.numpy(), indices, n  # already upright


def read_audio(path, sample_rate: int) -> np.ndarray | None:
    """Whole first audio track → mono float32 at `sample_rate` (channels resampled, then averaged)."""
    from torchcodec.decoders import AudioDecoder

    if Path(os.fspath(path)).suffix.lower() not in AUDIO_SUFFIXES:
        raise ValueError(f"torchcodec audio is used for {sorted(AUDIO_SUFFIXES)} files only, not {path}")

    samples = AudioDecoder(os.fspath(path), sample_rate=sample_rate).get_all_samples().data
    return samples.mean(0).numpy() if samples.numel() else None
