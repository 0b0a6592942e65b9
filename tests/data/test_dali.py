"""DALI pipelines: same contract as the CPU back-end, checked for parity on the same clips.

A DALI run decodes what DALI cannot (H.264 on a CPU, stills) with PyAV converted to RGB the
DALI way (`media.yuv420_to_rgb`) and resized by DALI: on ffmpeg's sharp `testsrc2` pattern that
path and DALI's own decode agree within 0.015 (CLIP units). The `cpu` run below (libswscale
pixels, torch resize) is a different back-end: the feature cache records which one it holds.

On this CPU-only machine DALI's CPU operators run the pipelines on VP9 / MJPEG clips and FLAC
audio (its CPU decoders read no H.264 or AAC). Measured parity with PyAV (normalised units,
textured 96x64 clips): mean |diff| 0.017 (VP9) / 0.009 (MJPEG), max 0.09; the test bounds are
mean < 0.05, max < 0.25. At hard colour edges single pixels differ more (up to ~0.95): libswscale
point-samples 4:2:0 chroma, DALI interpolates it. Resampled audio agrees to 3e-5 away from the
track's ends; the 48 kHz FLAC side-car decodes bit-identically.
The GPU (NVDEC) variants run only where CUDA is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="needs nvidia-dali (pip install nvidia-dali-cuda120)")

from dali_pipelines.audio import AudioBatchDecoder, decode_audio_dali, load_audio_segments_dali  # noqa: E402
from dali_pipelines.video import VideoBatchDecoder, decode_video_dali, normalize_frames_dali  # noqa: E402
from nemo_avllm.data import decode_pyav  # noqa: E402
from nemo_avllm.data.decode import decode_clip, load_audio_segments  # noqa: E402
from nemo_avllm.data.decode_pyav import decode_audio, probe  # noqa: E402
from nemo_avllm.data.index import load_index  # noqa: E402
from nemo_avllm.media import MediaError, sample_frame_indices  # noqa: E402
from nemo_avllm.data.prepare import prepare  # noqa: E402
from tests.media_factory import (  # noqa: E402
    FFMPEG,
    color_frames,
    frame_ids,
    garbage_file,
    make_audio_file,
    make_clip,
    split_frames,
    tone,
    trim_copy,
)

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVDEC decode, GPU operators)")

MEAN_TOL, MAX_TOL = 0.05, 0.25


def textured_frames(n: int = 20, w: int = 96, h: int = 64) -> np.ndarray:
    """Colour-coded frames with a diagonal ramp, so resampling differences would show."""
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = ((xx * 3 + yy * 2) % 60 - 30)[None, :, :, None]
    return np.clip(color_frames(n, w, h).astype(int) + ramp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali")
    frames = textured_frames()
    return {
        "vp9": make_clip(d / "v.webm", frames, vcodec="vp9", audio=tone(1.0, 48000, 700), acodec="opus"),
        "mjpeg": make_clip(d / "m.avi", frames, vcodec="mjpeg", audio=tone(1.0, 22050, 700), audio_rate=22050,
                           acodec="pcm"),
        "vp9_rot90": make_clip(d / "r.mp4", split_frames(6, 64, 32), vcodec="vp9", rotate=90),
        "h264": make_clip(d / "h.mp4", frames, vcodec="h264", gop=6, audio=tone(1.0, 44100, 700),
                          audio_rate=44100),
        "garbage": garbage_file(d / "g.webm"),
        "dir": d,
    }


def _parity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.float().cpu() - b.float().cpu()).abs()
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
@pytest.mark.parametrize("size", [224, 48])
def test_dali_cpu_video_matches_cpu_backend(clips, codec, size):
    path = clips[codec]
    cpu = decode_clip(path, num_frames=8, num_segments=2, image_size=size, backend="cpu")
    dali = decode_clip(path, num_frames=8, num_segments=2, image_size=size, backend="dali")
    assert dali.backend == ("dali-gpu" if torch.cuda.is_available() else "dali-cpu")
    assert dali.frame_indices == cpu.frame_indices == sample_frame_indices(20, 8)
    assert dali.num_frames == cpu.num_frames == 20
    assert dali.video.shape == cpu.video.shape == (8, 3, size, size) and dali.video.dtype == torch.float32
    assert frame_ids(dali.video) == dali.frame_indices
    mean, mx = _parity(dali.video, cpu.video)
    assert mean < MEAN_TOL and mx < MAX_TOL, (mean, mx)


def test_dali_applies_rotation_like_cpu_backend(clips):
    path = clips["vp9_rot90"]
    info = probe(path)
    assert info.rotation == 90
    idx = sample_frame_indices(info.num_frames, 3)
    dali = decode_video_dali(path, idx, rotation=info.rotation, image_size=32, device="cpu")
    cpu = decode_clip(path, num_frames=3, image_size=32, backend="cpu").video
    mean, _ = _parity(dali, cpu)
    assert mean < MEAN_TOL, mean
    # At the hard red/blue edge the back-ends differ by up to ~0.95: libswscale point-samples
    # 4:2:0 chroma, DALI interpolates it. Away from the two edge columns they agree.
    _, mx = _parity(torch.cat([dali[..., :14], dali[..., 18:]], -1), torch.cat([cpu[..., :14], cpu[..., 18:]], -1))
    assert mx < MAX_TOL, mx
    red = dali[0, 0] > dali[0, 2]
    assert red[:, :14].all() and not red[:, 18:].any()  # red (stored on top) is on the left, upright


def test_dali_and_cpu_agree_on_edit_list_trimmed_mp4(clips, tmp_path):
    src = make_clip(tmp_path / "src.mp4", num_frames=30, gop=10, vcodec="vp9")
    trimmed = trim_copy(src, tmp_path / "trim.mp4", 0.45)  # 5 leading frames hidden by an edit list
    cpu = decode_clip(trimmed, num_frames=8, image_size=32, backend="cpu")
    dali = decode_clip(trimmed, num_frames=8, image_size=32, backend="dali")
    assert cpu.num_frames == dali.num_frames == 25
    assert frame_ids(dali.video) == frame_ids(cpu.video) == [i + 5 for i in cpu.frame_indices]


def test_dali_run_decodes_what_dali_cannot_with_pyav_in_dalis_pixels(clips):
    with pytest.raises(MediaError, match="DALI"):
        decode_video_dali(clips["h264"], [0, 1], device="cpu")  # DALI's CPU decoder reads no H.264
    if not torch.cuda.is_available():
        # one back-end per run: PyAV decodes the clip, converts like DALI, DALI resizes
        clip = decode_clip(clips["h264"], num_frames=4, image_size=32, backend="dali")
        assert clip.backend == "dali-cpu" and clip.video.shape == (4, 3, 32, 32)
        assert frame_ids(clip.video) == clip.frame_indices == sample_frame_indices(20, 4)


@pytest.fixture(scope="module")
def testsrc2(tmp_path_factory):
    """ffmpeg's sharp test pattern (text, colour bars, hard edges) in VP9, which DALI's CPU decoder reads."""
    import subprocess

    path = tmp_path_factory.mktemp("sharp") / "testsrc2.webm"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=10:duration=1",
                    "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def test_dali_pixels_match_pyav_in_dalis_convention_on_a_sharp_pattern(testsrc2):
    """DALI's CPU decode + resize vs PyAV's decode converted the DALI way (bilinear chroma,
    rounding) + the same DALI resize: within 0.05 (CLIP units) everywhere. With libswscale's
    conversion (a `cpu` run) the gap is ~0.5 at 64 px, ~1.3 at 224: why a cache holds one back-end."""
    info = probe(testsrc2)
    frames, idx, n = decode_pyav.decode_video_frames(testsrc2, 6, pixels="dali")
    assert n == info.num_frames == 10 and idx == sample_frame_indices(10, 6)
    for size in (224, 64):
        dali = decode_video_dali(testsrc2, idx, image_size=size, device="cpu")
        mean, mx = _parity(dali, normalize_frames_dali(frames, size, "cpu"))
        assert mx < 0.05 and mean < 1e-3, (size, mean, mx)
    swscale, _, _ = decode_pyav.decode_video_frames(testsrc2, 6)
    assert _parity(normalize_frames_dali(swscale, 64, "cpu"), dali)[1] > 0.3  # the convention matters


def test_corrupt_file_raises_media_error(clips):
    with pytest.raises(MediaError) as err:
        decode_video_dali(clips["garbage"], [0], device="cpu")
    assert str(clips["garbage"]) in str(err.value)
    ok = decode_video_dali(clips["vp9"], [0], image_size=32, device="cpu")  # the decoder recovers
    assert ok.shape == (1, 3, 32, 32)


def test_video_batch_decoder_skips_only_the_bad_item(clips):
    dec = VideoBatchDecoder(batch_size=3, image_size=32, device="cpu")
    items = [(clips["vp9"], [0, 10, 19], 0), (clips["mjpeg"], [1, 2, 3], 0), (clips["vp9_rot90"], [0, 1, 5], 90)]
    video, ok = dec.decode(items)
    assert video.shape == (3, 3, 3, 32, 32) and ok == [True, True, True]
    assert frame_ids(video[0]) == [0, 10, 19] and frame_ids(video[1]) == [1, 2, 3]
    video, ok = dec.decode([items[0], (clips["garbage"], [0, 1, 2], 0), (clips["dir"] / "nope.webm", [0, 0, 0], 0)])
    assert ok == [True, False, False]
    assert frame_ids(video[0]) == [0, 10, 19] and float(video[1:].abs().sum()) == 0.0


def test_dali_flac_audio_matches_cpu_backend(clips, tmp_path):
    # the prepare side-car (48 kHz mono FLAC) read by both back-ends: bit-identical
    report = prepare([clips["vp9"], clips["mjpeg"], clips["h264"]], tmp_path / "prep", num_workers=1, progress=False)
    assert report.with_audio == 3
    for rec in load_index(tmp_path / "prep"):
        a = decode_audio_dali(rec["flac"])
        b = decode_audio(rec["flac"])
        np.testing.assert_array_equal(a, b)
        seg_dali = load_audio_segments_dali(rec["flac"], num_segments=4)
        seg_cpu = load_audio_segments(rec["flac"], num_segments=4)
        assert seg_dali.shape == (4, 480000)
        torch.testing.assert_close(seg_dali, seg_cpu)
    # a stereo 44.1 kHz FLAC: DALI's downmix + resampler vs. PyAV's mean + libswresample
    stereo = make_audio_file(tmp_path / "s.flac", tone(1.0, 44100, 700, gains=(0.6, 0.2)), 44100)
    a, b = decode_audio_dali(stereo), decode_audio(stereo)
    assert len(a) == len(b) == 48000
    assert np.abs(a[1000:-1000] - b[1000:-1000]).max() < 1e-3
    assert np.abs(a[1000:-1000]).max() == pytest.approx(0.4, abs=1e-3)  # mean of the channels


def test_decode_clip_dali_uses_the_side_car(clips, tmp_path):
    prepare([clips["vp9"]], tmp_path / "prep", num_workers=1, progress=False)
    rec = load_index(tmp_path / "prep")[0]
    dali = decode_clip(rec["path"], audio_path=rec["flac"], num_frames=4, image_size=32, backend="dali")
    cpu = decode_clip(rec["path"], audio_path=rec["flac"], num_frames=4, image_size=32, backend="cpu")
    torch.testing.assert_close(dali.audio, cpu.audio)
    assert dali.has_audio and dali.audio.shape == (4, 480000)


def test_audio_batch_decoder(clips, tmp_path):
    flac = make_audio_file(tmp_path / "a.flac", tone(2.0, 48000, 1000), 48000)
    ogg = make_audio_file(tmp_path / "a.ogg", tone(1.0, 48000, 1000), 48000, acodec="vorbis")
    bad = garbage_file(tmp_path / "bad.flac")
    dec = AudioBatchDecoder(batch_size=3, num_segments=2)
    audio, ok = dec.decode([flac, bad, ogg])
    assert audio.shape == (3, 2, 480000) and ok == [True, False, True]
    assert float(audio[1].abs().sum()) == 0.0
    np.testing.assert_allclose(audio[0, 0, :48000].numpy(), tone(1.0, 48000, 1000)[:, 0], atol=1e-4)
    with pytest.raises(MediaError):
        decode_audio_dali(bad)


# ---------------------------------------------------------------------------------------------
# GPU (NVDEC) — skipped without CUDA
# ---------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
def test_dali_gpu_video_matches_cpu_backend(clips, codec):
    path = clips[codec]
    cpu = decode_clip(path, num_frames=8, image_size=224, backend="cpu")
    gpu = decode_clip(path, num_frames=8, image_size=224, backend="auto")
    assert gpu.backend == "dali-gpu" and gpu.video.is_cuda
    assert gpu.frame_indices == cpu.frame_indices
    mean, mx = _parity(gpu.video, cpu.video)
    assert mean < MEAN_TOL and mx < MAX_TOL, (mean, mx)


@needs_gpu
@pytest.mark.gpu
def test_dali_gpu_batch_decoder(clips):
    dec = VideoBatchDecoder(batch_size=2, image_size=64, device="gpu")
    idx = sample_frame_indices(20, 4)
    video, ok = dec.decode([(clips["h264"], idx, 0), (clips["vp9_rot90"], [0, 1, 2, 3], 90)])
    assert ok == [True, True] and video.is_cuda and video.shape == (2, 4, 3, 64, 64)
    assert frame_ids(video[0]) == idx


@needs_gpu
@pytest.mark.gpu
def test_dali_gpu_run_resizes_a_still_image_with_dali(tmp_path):
    """NVDEC reads no stills: PyAV decodes it, DALI resizes it on the GPU, as for the run's videos."""
    from tests.media_factory import make_image

    path = make_image(tmp_path / "s.png", textured_frames(1)[0])
    clip = decode_clip(path, num_frames=4, image_size=32, backend="dali")
    assert clip.backend == "dali-gpu" and clip.video.is_cuda and clip.video.shape == (4, 3, 32, 32)
    frames, _, _ = decode_pyav.decode_video_frames(path, 4, pixels="dali")
    mean, mx = _parity(clip.video, normalize_frames_dali(frames, 32, "cpu"))
    assert mx < 0.05, (mean, mx)
