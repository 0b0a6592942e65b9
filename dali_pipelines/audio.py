"""DALI audio pipeline: FLAC side-car (or WAV/OGG) → 48 kHz mono float32 → `[K, W]` segments.

`fn.decoders.audio` is a CPU operator and reads WAV, FLAC and OGG (Vorbis/Opus) only — not AAC
inside an MP4 — which is why `prepare` writes a 48 kHz mono FLAC side-car per video. The
decoded waveforms have different lengths per clip, so the K-segment split and repeat-padding is
done after the pipeline by `nemo_avllm.media.segment_audio`, the same function the CPU
back-end uses.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from nemo_avllm.media import (
    CLAP_WINDOW,
    DEFAULT_NUM_SEGMENTS,
    SAMPLE_RATE,
    MediaError,
    audio_segments,
    segment_audio,
)
from dali_pipelines.video import error_detail, read_bytes


@pipeline_def
def clip_audio_pipeline(sample_rate: int = SAMPLE_RATE):
    """External input: the audio file's bytes. Output: mono float32 waveform at `sample_rate`
    (DALI's downmix averages the channels, as the contract asks)."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    wave, _rate = fn.decoders.audio(encoded, sample_rate=float(sample_rate), downmix=True, dtype=types.FLOAT)
    return wave


class AudioBatchDecoder:
    """A built pipeline that decodes batches of audio files into `[B, K, W]` segments.

    `decode(paths)` returns the segments and a per-item ok flag (zeros, ok=False for a file that
    fails or holds no samples; each item of a failing batch is retried alone). Not thread-safe.
    """

    def __init__(
        self,
        batch_size: int,
        sample_rate: int = SAMPLE_RATE,
        num_segments: int = DEFAULT_NUM_SEGMENTS,
        window: int = CLAP_WINDOW,
        num_threads: int = 2,
    ):
        self.batch_size = batch_size
        self.sample_rate = sample_rate
        self.num_segments = num_segments
        self.window = window
        self.num_threads = num_threads
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = clip_audio_pipeline(
                sample_rate=self.sample_rate,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=None,  # the audio decoder is CPU-only; the GPU gets the segments
                prefetch_queue_depth=1,
                exec_dynamic=True,
            )
            self._pipe.build()
        return self._pipe

    def waves(self, encoded: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded mono waveforms, one per encoded file."""
        pipe = self._pipeline()
        pipe.feed_input("encoded", encoded)
        try:
            (out,) = pipe.run()
        except Exception:
            self._pipe = None
            raise
        return [np.array(out[i]).reshape(-1) for i in range(len(encoded))]

    def decode(self, paths: Sequence) -> tuple[torch.Tensor, list[bool]]:
        if not 0 < len(paths) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} paths, got {len(paths)}")
        out = np.zeros((len(paths), self.num_segments, self.window), np.float32)
        ok = [False] * len(paths)
        encoded = []
        for p in paths:
            try:
                encoded.append(read_bytes(p))
            except MediaError:
                encoded.append(None)
        live = [i for i, e in enumerate(encoded) if e is not None]
        waves: dict[int, np.ndarray] = {}
        try:
            if len(live) == len(paths):
                waves = dict(enumerate(self.waves(encoded)))
        except Exception:
            waves = {}
        if not waves:
            for i in live:
                try:
                    waves[i] = self.waves([encoded[i]])[0]
                except Exception:
                    pass
        for i, w in waves.items():
            if w.size:
                out[i] = segment_audio(w, self.num_segments, self.window)
                ok[i] = True
        return torch.from_numpy(out), ok


_DECODERS: dict[int, AudioBatchDecoder] = {}


def decode_audio_dali(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """One audio file → mono float32 at `sample_rate`; None when it holds no samples.

    Raises MediaError when DALI cannot read it (corrupt, or not WAV/FLAC/OGG).
    """
    if sample_rate not in _DECODERS:
        _DECODERS[sample_rate] = AudioBatchDecoder(1, sample_rate=sample_rate)
    try:
        wave = _DECODERS[sample_rate].waves([read_bytes(path)])[0]
    except RuntimeError as e:
        raise MediaError(path, f"DALI could not decode the audio (WAV/FLAC/OGG only): {error_detail(e)}") from e
    return wave if wave.size else None


def load_audio_segments_dali(
    path,
    num_segments: int = DEFAULT_NUM_SEGMENTS,
    sample_rate: int = SAMPLE_RATE,
    window: int = CLAP_WINDOW,
) -> torch.Tensor | None:
    """DALI counterpart of `decode.load_audio_segments`: `[K, W]` float32, or None."""
    return audio_segments(decode_audio_dali(path, sample_rate), num_segments, window)
