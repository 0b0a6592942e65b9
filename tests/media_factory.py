"""Real test media, made with ffmpeg in a subprocess, with content tests can check.

Video frame `i` is a solid colour that encodes `i` (:func:`frame_color` / :func:`frame_id`), so a
test can tell which frames a decoder returned. Audio is written from numpy (exact per-channel
content: tones with known frequency and per-channel gains) to a temporary WAV and muxed in.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

FFMPEG = shutil.which("ffmpeg")

from nemo_avllm.data.ffmpeg import AUDIO_CODECS, VIDEO_CODECS, encode, run_ffmpeg  # noqa: F401

COLOR_STEP = 7  # frame i has red = 16 + 7 i: ids stay apart by far more than codec error


def frame_color(i: int) -> tuple[int, int, int]:
    """Colour of frame `i` (0 <= i < 32): red encodes the index, green its complement."""
    if not 0 <= i < 32:
        raise ValueError("frame ids are encoded for 0 <= i < 32")
    r = 16 + COLOR_STEP * i
    return r, 255 - r, 128


def frame_id(rgb) -> int:
    """Inverse of :func:`frame_color` from a mean pixel (uint8 scale)."""
    return int(round((float(rgb[0]) - 16) / COLOR_STEP))


def color_frames(num_frames: int, width: int = 64, height: int = 48) -> np.ndarray:
    """uint8 `[N, H, W, 3]`, frame i filled with `frame_color(i)`."""
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        out[i] = frame_color(i)
    return out


def split_frames(num_frames: int, width: int = 64, height: int = 48,
                 top=(255, 0, 0), bottom=(0, 0, 255)) -> np.ndarray:
    """Top half `top`, bottom half `bottom` (red over blue): shows orientation after decoding."""
    out = np.empty((num_frames, height, width, 3), np.uint8)
    out[:, : height // 2] = top
    out[:, height // 2 :] = bottom
    return out


def tone(seconds: float, rate: int, freq: float = 440.0, gains: Sequence[float] = (0.5,)) -> np.ndarray:
    """float32 `[n, C]`: channel c is `gains[c] * sin(2 pi freq t)`."""
    t = np.arange(int(round(seconds * rate))) / rate
    s = np.sin(2 * np.pi * freq * t)
    return np.stack([g * s for g in gains], axis=1).astype(np.float32)


def make_clip(
    path,
    frames: np.ndarray | None = None,
    *,
    num_frames: int = 10,
    fps: float = 10,
    size: tuple[int, int] = (64, 48),
    vcodec: str = "h264",
    audio: np.ndarray | None = None,
    audio_rate: int = 48000,
    acodec: str = "aac",
    rotate: int | None = None,
    vfr: bool = False,
    gop: int | None = None,
    faststart: bool = False,
    extra: Sequence[str] = (),
) -> Path:
    """Encode `frames` (default: :func:`color_frames`) and optional `audio` (`[n, C]` float) into
    `path`; the container follows the suffix. `rotate` writes display-matrix rotation metadata
    (clockwise degrees, ffmpeg's `rotate` tag), `vfr` spaces frames unevenly (t_i = 0.05 i +
    0.005 i^2 s), `gop` sets the keyframe interval."""
    path = Path(path)
    if frames is None:
        w, h = size
        frames = color_frames(num_frames, w, h)
    out = ["-g", str(gop)] if gop else []
    if vfr:
        # frames come in on a 1 ms clock and are re-timed; the encoder keeps the 1 ms base
        out += ["-vf", "setpts=(N*0.05+N*N*0.005)/TB", "-fps_mode", "passthrough"]
    if faststart:
        out += ["-movflags", "+faststart"]
    out += list(extra)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / f"enc{path.suffix}" if rotate is not None else path
        encode(target, frames, 1000 if vfr else fps, audio=audio, audio_rate=audio_rate, vcodec=vcodec,
               acodec=acodec, output_args=out)
        if rotate is not None:  # ffmpeg 5.1 only writes the tag when stream-copying
            run_ffmpeg(["-i", str(target), "-map", "0", "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}", str(path)])
    return path


def make_image(path, rgb: np.ndarray, exif_orientation: int | None = None) -> Path:
    """Still image (PNG/JPEG by suffix) from uint8 `[H, W, 3]`. `exif_orientation` (JPEG only,
    e.g. 6 = "turn 90° clockwise to view", as phones write) is tagged with Pillow."""
    path = Path(path)
    if exif_orientation is not None:
        from PIL import Image

        im = Image.fromarray(rgb)
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        im.save(path, format="JPEG", quality=95, exif=exif)
        return path
    h, w, _ = rgb.shape
    args = ["-q:v", "2"] if path.suffix.lower() in (".jpg", ".jpeg") else []
    run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-i", "-",
          "-frames:v", "1", *args, str(path)], stdin=np.ascontiguousarray(rgb).tobytes())
    return path


def make_audio_file(path, audio: np.ndarray, rate: int = 48000, acodec: str | None = None) -> Path:
    """Audio-only file (WAV/FLAC/OGG/M4A by suffix) from `[n, C]` float."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "a.wav"
        sf.write(wav, audio, rate, subtype="FLOAT")
        codec = AUDIO_CODECS[acodec] if acodec else []
        run_ffmpeg(["-i", str(wav), *codec, str(path)])
    return path


def trim_copy(src, dst, start: float) -> Path:
    """Stream-copy from `start` seconds: an mp4 whose edit list hides the GOP's leading frames."""
    run_ffmpeg(["-ss", str(start), "-i", str(src), "-map", "0", "-c", "copy", str(dst)])
    return Path(dst)


def truncate_copy(src, dst, keep: float = 0.5) -> Path:
    """Copy the first `keep` fraction of `src`'s bytes: a download cut short."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def garbage_file(path, nbytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes with a video suffix: a corrupt file."""
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return Path(path)


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the strongest FFT bin: checks a tone survived decoding/resampling."""
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spec) * rate / len(wave))


def mean_rgb(video) -> np.ndarray:
    """`[T, 3]` mean colour (0..255) of each frame of a CLIP-normalised `[T, 3, S, S]` tensor."""
    from nemo_avllm.media import CLIP_MEAN, CLIP_STD

    x = np.asarray(video.detach().cpu().float().numpy(), dtype=np.float64)
    x = x * np.array(CLIP_STD)[None, :, None, None] + np.array(CLIP_MEAN)[None, :, None, None]
    return x.mean(axis=(2, 3)) * 255.0


def frame_ids(video) -> list[int]:
    """Frame ids (see :func:`frame_color`) of a decoded, normalised clip of colour frames."""
    return [frame_id(c) for c in mean_rgb(video)]


def conv(*turns: str) -> list[dict]:
    """human, gpt, human, gpt, ... turns from plain strings."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def make_media_set(d: Path, second_rate: int = 48000) -> Path:
    """The data tests' clips: av1.mp4 (H.264+AAC, 440 Hz), av2.webm (VP9+Opus, 1 kHz at
    `second_rate`), mute.mp4 (no audio), still.png (an image) and corrupt.mp4 (garbage)."""
    d = Path(d)
    make_clip(d / "av1.mp4", num_frames=8, audio=tone(1.0, 48000, 440))
    make_clip(d / "av2.webm", num_frames=6, vcodec="vp9", audio=tone(0.5, second_rate, 1000), audio_rate=second_rate,
              acodec="opus")
    make_clip(d / "mute.mp4", num_frames=5)
    make_image(d / "still.png", color_frames(4, 40, 30)[3])
    garbage_file(d / "corrupt.mp4")
    return d
