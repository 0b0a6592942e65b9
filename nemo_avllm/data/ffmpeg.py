"""Encode numpy frames (and audio) into a real media file with the ffmpeg binary.

Used by the demo's synthetic dataset and by the tests' media factory: what they produce are real
H.264/AAC (or other codec) files that the decoders read like any downloaded clip."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

# Encoder arguments per short codec name: small, fast, faithful enough for colour checks.
VIDEO_CODECS = {
    "h264": ["-c:v", "libx264", "-preset", "veryfast", "-crf", "12", "-pix_fmt", "yuv420p"],
    "vp9": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-crf", "12", "-b:v", "0",
            "-pix_fmt", "yuv420p"],
    "mjpeg": ["-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj420p"],
    "mpeg4": ["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"],
}
AUDIO_CODECS = {
    "aac": ["-c:a", "aac", "-b:a", "192k"],
    "opus": ["-c:a", "libopus", "-b:a", "128k"],
    "vorbis": ["-c:a", "libvorbis", "-q:a", "6"],
    "flac": ["-c:a", "flac"],
    "pcm": ["-c:a", "pcm_s16le"],
}


def ffmpeg_binary() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg is not installed: apt-get install ffmpeg (scripts/setup.sh does it)")
    return exe


def run_ffmpeg(args: Sequence[str], stdin: bytes | None = None) -> None:
    cmd = [ffmpeg_binary(), "-v", "error", "-y", *args]
    res = subprocess.run(cmd, input=stdin, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.decode(errors='replace')[-2000:]}")


def encode(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    audio_rate: int = 48000,
    vcodec: str = "h264",
    acodec: str = "aac",
    input_args: Sequence[str] = (),
    output_args: Sequence[str] = (),
) -> Path:
    """Write `frames` (uint8 [n, H, W, 3] RGB) at `fps` and optional `audio` ([samples] or
    [samples, channels] float in [-1, 1]) to `path`; the container follows the suffix."""
    import soundfile as sf

    path = Path(path)
    n, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), *input_args, "-i", "-"]
        if audio is not None:
            wav = Path(tmp) / "a.wav"
            sf.write(wav, audio, audio_rate, subtype="FLOAT")
            args += ["-i", str(wav), "-map", "0:v", "-map", "1:a", *AUDIO_CODECS[acodec]]
        args += [*VIDEO_CODECS[vcodec], *output_args, str(path)]
        run_ffmpeg(args, stdin=np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
    return path
