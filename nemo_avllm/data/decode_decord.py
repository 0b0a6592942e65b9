"""decord back-end of the decoding contract (`media.py`): frames, where installed.

decord (pip `decord`, extra `decoders`) bundles its own FFmpeg; its RGB frames are libswscale's,
byte for byte what PyAV returns. Frames are sampled over the probe's frame count (`MediaInfo`);
a file whose count decord sees differently is refused, so `decode.read_video_frames` falls back
to the next decoder. decord turns frames upright itself (display matrix). Its audio reader is not used (it resamples with a different filter).
"""

from __future__ import annotations

import os

import numpy as np

from nemo_avllm.media import MediaInfo, decode_threads, sample_frame_indices

NAME = "decord"


def available() -> bool:
    import decord  # noqa: F401 - raises ImportError when absent

    return True


def read_frames(path, num_frames: int, info: MediaInfo) -> tuple[np.ndarray, list[int], int]:
    """T frames sampled over `info.num_frames`, upright uint8 `[T, H, W, 3]`, indices, count."""
    import decord

    reader = decord.VideoReader(os.fspath(path), num_threads=decode_threads())
    n = len(reader)
    if n != info.num_frames:
        raise ValueError(f"decord counts {n} frames in {path}, the probe {info.num_frames}")
    indices = sample_frame_indices(n, num_frames)
    return reader.get_batch(indices).asnumpy(), indices, n  # already upright
