"""CPU back-end (PyAV) of the media contract, on real files made with ffmpeg."""

from __future__ import annotations

import pickle
import subprocess

import av
import numpy as np
import pytest
import torch

from nemo_avllm import media
from nemo_avllm.data import decode, decode_pyav
from nemo_avllm.data.decode import decode_clip
from nemo_avllm.data.decode_pyav import decode_audio, decode_video_frames, probe
from nemo_avllm.media import CLAP_WINDOW, MediaError, crop_offset, resized_shape, sample_frame_indices, segment_audio
from tests.media_factory import (
    FFMPEG,
    VIDEO_CODECS,
    color_frames,
    dominant_frequency,
    frame_color,
    frame_ids,
    garbage_file,
    make_audio_file,
    make_clip,
    make_image,
    mean_rgb,
    run_ffmpeg,
    split_frames,
    tone,
    trim_copy,
    truncate_copy,
)

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------


def test_sample_frame_indices_uniform():
    assert sample_frame_indices(100, 5) == [0, 25, 50, 74, 99]  # round(24.75)=25, round(74.25)=74
    assert sample_frame_indices(300, 32)[0] == 0 and sample_frame_indices(300, 32)[-1] == 299
    assert sample_frame_indices(32, 32) == list(range(32))


def test_sample_frame_indices_fewer_frames_repeat():
    assert sample_frame_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]
    assert sample_frame_indices(1, 4) == [0, 0, 0, 0]  # a still image
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def test_resize_and_crop_geometry():
    assert resized_shape(360, 640, 224) == (224, 398)
    assert resized_shape(640, 360, 224) == (398, 224)
    assert resized_shape(48, 80, 32) == (32, 53)
    assert crop_offset(398, 224) == 87 and crop_offset(5, 4) == 1  # half rounds up, like DALI


def test_segment_audio_repeat_pad_and_centre_crop():
    wave = np.arange(12, dtype=np.float32)
    seg = segment_audio(wave, num_segments=3, window=10)  # segments [0..3], [4..7], [8..11]
    assert seg.shape == (3, 10) and seg.dtype == np.float32
    np.testing.assert_array_equal(seg[0], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(seg[2], [8, 9, 10, 11, 8, 9, 10, 11, 8, 9])
    long = np.arange(40, dtype=np.float32)
    seg = segment_audio(long, num_segments=2, window=10)  # segments of 20 → centre 10
    np.testing.assert_array_equal(seg[0], np.arange(5, 15))
    np.testing.assert_array_equal(seg[1], np.arange(25, 35))
    tiny = segment_audio(np.array([1.0, 2.0], np.float32), num_segments=4, window=3)
    assert tiny.shape == (4, 3) and np.isfinite(tiny).all()


# ---------------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------------


def test_h264_aac_clip_full_contract(tmp_path):
    # 30 colour-coded frames, keyframe every 7 (so the decoder seeks), B-frames, stereo AAC tone.
    path = make_clip(tmp_path / "c.mp4", num_frames=30, fps=10, gop=7,
                     audio=tone(3.0, 44100, 1000, gains=(0.6, 0.2)), audio_rate=44100, acodec="aac")
    clip = decode_clip(path, num_frames=8, num_segments=4, image_size=224, backend="cpu")
    assert clip.backend == "cpu"
    assert clip.video.shape == (8, 3, 224, 224) and clip.video.dtype == torch.float32
    assert clip.num_frames == 30
    assert clip.frame_indices == sample_frame_indices(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert frame_ids(clip.video) == clip.frame_indices
    assert clip.has_audio and clip.audio.shape == (4, CLAP_WINDOW) and clip.audio.dtype == torch.float32
    # 3 s at 48 kHz in 4 segments of 36000 samples, each tiled to 480000; mono = mean of channels.
    seg = clip.audio[1].numpy()
    np.testing.assert_allclose(seg[:36000], seg[36000:72000], atol=1e-6)
    assert dominant_frequency(seg[:36000], 48000) == pytest.approx(1000, abs=3)
    assert np.abs(seg).max() == pytest.approx(0.4, rel=0.05)  # AAC is lossy


def test_seeking_decoder_matches_sequential_decode(tmp_path):
    path = make_clip(tmp_path / "g.mp4", num_frames=31, gop=5)
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        index = decode_pyav._scan_video(c, vs, str(path))
        wanted = [0, 3, 11, 12, 29, 30]
        by_seek = decode_pyav._decode_seek(c, vs, index, wanted)
        assert by_seek is not None, "the pts index should let the decoder seek on a plain mp4"
        seq, n = decode_pyav._decode_sequential(c, vs, set(wanted))
    assert n == 31
    for i in wanted:
        np.testing.assert_array_equal(by_seek[i].to_ndarray(format="rgb24"), seq[i].to_ndarray(format="rgb24"))


def test_fewer_frames_than_T_repeats_frames(tmp_path):
    path = make_clip(tmp_path / "short.mp4", num_frames=5)
    clip = decode_clip(path, num_frames=8, image_size=32, backend="cpu")
    assert clip.num_frames == 5
    assert clip.frame_indices == [0, 1, 1, 2, 2, 3, 3, 4]
    assert frame_ids(clip.video) == clip.frame_indices
    torch.testing.assert_close(clip.video[1], clip.video[2])


@pytest.mark.parametrize("suffix,vcodec", [(".mp4", "h264"), (".webm", "vp9")])
def test_variable_frame_rate(tmp_path, suffix, vcodec):
    path = make_clip(tmp_path / f"vfr{suffix}", num_frames=20, vcodec=vcodec, vfr=True)
    # the file really is VFR: frame intervals grow from 55 ms to 235 ms
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", "packet=pts_time",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    times = sorted(float(t) for t in out.split())
    gaps = np.diff(times)
    assert len(times) == 20 and gaps.max() > 3 * gaps.min()
    info = probe(path)
    assert info.num_frames == 20
    assert info.duration == pytest.approx(times[-1], abs=0.06)
    clip = decode_clip(path, num_frames=7, image_size=32, backend="cpu")
    assert clip.frame_indices == sample_frame_indices(20, 7)
    assert frame_ids(clip.video) == clip.frame_indices


def test_frame_count_when_header_says_zero(tmp_path):
    path = make_clip(tmp_path / "v.webm", num_frames=13, vcodec="vp9")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # webm carries no frame count
    assert probe(path).num_frames == 13
    frames, indices, n = decode_video_frames(path, 4)
    assert n == 13 and indices == [0, 4, 8, 12]
    assert [round((f[..., 0].mean() - 16) / 7) for f in frames] == indices


def test_edit_list_trimmed_mp4_counts_shown_frames(tmp_path):
    # `ffmpeg -ss 0.45 -c copy` (like a phone's trim) keeps the GOP's leading packets, marked
    # discard by an edit list: they are decoded but never shown, so they are not frames.
    src = make_clip(tmp_path / "src.mp4", num_frames=30, gop=10)
    trimmed = trim_copy(src, tmp_path / "trim.mp4", 0.45)
    assert probe(trimmed).num_frames == 25
    frames, indices, n = decode_video_frames(trimmed, 8)
    assert n == 25 and indices == sample_frame_indices(25, 8)
    assert [round((f[..., 0].mean() - 16) / 7) for f in frames] == [i + 5 for i in indices]


def _every_frame(path) -> np.ndarray:
    """Reference: every frame decoded in order, plain PyAV, libswscale RGB."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.mark.parametrize("vcodec,suffix", [("h264", ".mp4"), ("h264", ".mkv"), ("mpeg4", ".avi"), ("vp9", ".webm")])
def test_unreferenced_frames_are_skipped_and_wanted_frames_unchanged(tmp_path, vcodec, suffix):
    # x264 and mpeg4 write B-frames that no frame refers to: the decoder drops the unwanted ones
    # undecoded (skip_frame=NONREF); every frame returned is still the full decode's, byte for byte.
    path = tmp_path / f"b{suffix}"  # moving content: the encoders choose B-frames for it
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10:duration=3.2", *VIDEO_CODECS[vcodec],
                "-g", "32", *(["-bf", "2"] if vcodec == "mpeg4" else []), str(path)])
    every = _every_frame(path)
    assert len(every) == 32
    for T in (1, 5, 13, 32, 45):
        frames, indices, n = decode_video_frames(path, T)
        assert n == 32 and indices == sample_frame_indices(32, T)
        np.testing.assert_array_equal(frames, every[indices], err_msg=f"T={T}")
    if vcodec != "vp9":  # VP9 has no B-frames: nothing to skip
        with av.open(str(path)) as c:
            decoded = sum(1 for _ in decode_pyav._decode_skipping(c, c.streams.video[0], keep=set()))
        assert decoded < 32, "no frame was skipped"


def test_one_pass_clip_equals_separate_reads(tmp_path):
    """`read_clip` (frames and the container's audio from one open) gives what the two separate
    readers give; without an audio stream the wave is None."""
    av_clip = make_clip(tmp_path / "av.mp4", num_frames=20, gop=6, audio=tone(2.0, 44100, 700, (0.6, 0.2)),
                        audio_rate=44100)
    mute = make_clip(tmp_path / "mute.mp4", num_frames=12)
    frames, indices, n, wave = decode_pyav.read_clip(av_clip, 7)
    ref_frames, ref_indices, ref_n = decode_video_frames(av_clip, 7)
    np.testing.assert_array_equal(frames, ref_frames)
    assert (indices, n) == (ref_indices, ref_n)
    np.testing.assert_array_equal(wave, decode_audio(av_clip))
    assert decode_pyav.read_clip(mute, 4)[3] is None and decode_pyav.read_clip(av_clip, 4, None)[3] is None
    one = decode_clip(av_clip, num_frames=7, num_segments=2, image_size=32, backend="cpu")
    np.testing.assert_array_equal(one.audio.numpy(), segment_audio(decode_audio(av_clip), 2))
    np.testing.assert_array_equal(one.video.numpy(), media.normalize_frames(ref_frames, 32).numpy())


@pytest.mark.parametrize(
    "suffix,acodec,rate,gains",
    [(".m4a", "aac", 44100, (0.6, 0.2)), (".flac", "flac", 22050, (0.5,)), (".wav", "pcm", 48000, (0.4, 0.1)),
     (".ogg", "vorbis", 44100, (0.5, 0.3)), (".opus", "opus", 48000, (0.3, 0.3, 0.2, 0.1, 0.3, 0.2))],
)
def test_batched_resampling_equals_frame_by_frame(tmp_path, suffix, acodec, rate, gains):
    """`decode_audio` resamples ~1 s batches of decoded frames; libswresample then gives the
    same samples, bit for bit, as resampling each decoded frame on its own (the old way)."""
    path = make_audio_file(tmp_path / f"a{suffix}", tone(2.5, rate, 900, gains), rate, acodec=acodec)
    resampler, chunks = av.AudioResampler(format="fltp", layout=None, rate=48000), []
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.audio[0]):
            frame.pts = None
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    ref = np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)
    np.testing.assert_array_equal(decode_audio(path), ref)
    np.testing.assert_array_equal(np.concatenate(list(decode_pyav.iter_audio(path))), ref)


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, rotate):
    # stored 64x32 (W x H): red on top, blue below; the display matrix says to turn it.
    path = make_clip(tmp_path / f"rot{rotate}.mp4", split_frames(12, 64, 32), rotate=rotate, gop=4)
    info = probe(path)
    assert (info.width, info.height) == (64, 32)
    frames, _, _ = decode_video_frames(path, 3)
    # ffmpeg's own auto-rotation is the reference for "upright"
    ref = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    h, w = (64, 32) if rotate in (90, 270) else (32, 64)
    ref = np.frombuffer(ref, np.uint8).reshape(h, w, 3)
    assert frames.shape[1:] == (h, w, 3)
    assert np.abs(frames[0].astype(int) - ref.astype(int)).mean() < 2
    clip = decode_clip(path, num_frames=2, image_size=32, backend="cpu")
    red = clip.video[0, 0] > clip.video[0, 2]  # red channel dominates where the red half is
    expected_red_side = {90: (slice(None), slice(0, 14)), 180: (slice(18, None), slice(None)),
                         270: (slice(None), slice(18, None))}[rotate]
    assert red[expected_red_side].all()
    assert red.float().mean() == pytest.approx(0.5, abs=0.05)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    path = make_image(tmp_path / "phone.jpg", split_frames(1, 64, 32)[0], exif_orientation=6)
    assert probe(path).rotation == 270  # EXIF 6 = 90° clockwise = 270° counter-clockwise
    frames, _, _ = decode_video_frames(path, 1)
    assert frames.shape == (1, 64, 32, 3)  # portrait, as a viewer shows it
    assert frames[0, :, -8:, 0].mean() > 200 and frames[0, :, :8, 2].mean() > 200  # red turned to the right


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_still_image_is_a_one_frame_video(tmp_path, suffix):
    rgb = color_frames(10, 80, 60)[6]
    path = make_image(tmp_path / f"img{suffix}", rgb)
    info = probe(path)
    assert info.is_image and info.num_frames == 1 and not info.has_audio
    clip = decode_clip(path, num_frames=4, image_size=48, backend="auto")
    assert clip.backend == "cpu"
    assert clip.frame_indices == [0, 0, 0, 0] and clip.num_frames == 1
    assert clip.video.shape == (4, 3, 48, 48)
    assert frame_ids(clip.video) == [6] * 4
    assert not clip.has_audio and clip.audio is None


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------


def test_no_audio_track(tmp_path):
    path = make_clip(tmp_path / "mute.mp4", num_frames=5)
    assert not probe(path).has_audio
    clip = decode_clip(path, num_frames=2, image_size=32, backend="cpu")
    assert clip.audio is None and clip.has_audio is False
    assert decode_audio(path) is None


def test_silent_audio_is_valid_audio(tmp_path):
    path = make_clip(tmp_path / "silent.mp4", num_frames=5, audio=np.zeros((48000, 2), np.float32))
    clip = decode_clip(path, num_frames=2, image_size=32, backend="cpu")
    assert clip.has_audio and clip.audio.shape == (4, CLAP_WINDOW)
    assert float(clip.audio.abs().max()) == 0.0


@pytest.mark.parametrize(
    "gains",
    [(0.5,), (0.6, 0.2), (0.6, 0.3, 0.3, 0.0, 0.3, 0.3)],  # mono, stereo, 5.1
    ids=["mono", "stereo", "5.1"],
)
def test_channel_layouts_downmix_to_mean(tmp_path, gains):
    # FLAC in Matroska is lossless, so the plain-mean downmix can be checked exactly.
    path = make_clip(tmp_path / "ch.mkv", num_frames=5, audio=tone(1.0, 48000, 1000, gains), acodec="flac")
    info = probe(path)
    assert info.audio_channels == len(gains)
    wave = decode_audio(path)
    assert wave.shape == (48000,)
    expected = tone(1.0, 48000, 1000, (float(np.mean(gains)),))[:, 0]
    np.testing.assert_allclose(wave, expected, atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 96000])
def test_sample_rates_resample_to_48k(tmp_path, rate):
    path = make_clip(tmp_path / f"sr{rate}.mkv", num_frames=5, audio=tone(1.3, rate, 1000), audio_rate=rate,
                     acodec="flac")
    assert probe(path).audio_sample_rate == rate
    wave = decode_audio(path)
    assert len(wave) == 62400  # 1.3 s at 48 kHz
    assert dominant_frequency(wave, 48000) == pytest.approx(1000, abs=2)
    interior = wave[2000:-2000]
    assert np.abs(interior).max() == pytest.approx(0.5, abs=0.01)
    clip = decode_clip(path, num_frames=2, num_segments=2, image_size=32, backend="cpu")
    np.testing.assert_array_equal(clip.audio[0, :31200].numpy(), wave[:31200])


def test_audio_side_car_replaces_container_audio(tmp_path):
    video = make_clip(tmp_path / "v.mp4", num_frames=5, audio=tone(1.0, 48000, 440))
    side = make_audio_file(tmp_path / "a.flac", tone(2.0, 48000, 2000), 48000)
    clip = decode_clip(video, audio_path=side, num_frames=2, num_segments=1, image_size=32, backend="cpu")
    assert dominant_frequency(clip.audio[0, :96000].numpy(), 48000) == pytest.approx(2000, abs=2)


# ---------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------


def test_truncated_and_corrupt_files_raise_media_error(tmp_path):
    good = make_clip(tmp_path / "good.mp4", num_frames=30, audio=tone(3.0, 48000))
    fast = make_clip(tmp_path / "fast.mp4", num_frames=30, faststart=True)
    cases = {
        "moov-lost": truncate_copy(good, tmp_path / "cut.mp4", 0.5),  # index at the end is gone
        "data-lost": truncate_copy(fast, tmp_path / "cutfast.mp4", 0.5),  # index kept, frames gone
        "garbage": garbage_file(tmp_path / "garbage.mp4"),
        "empty": garbage_file(tmp_path / "empty.webm", nbytes=0),
        "missing": tmp_path / "missing.mp4",
    }
    for name, path in cases.items():
        for fn in (probe, lambda p: decode_clip(p, num_frames=4, image_size=32, backend="cpu")):
            with pytest.raises(MediaError) as err:
                fn(path)
            assert str(path) in str(err.value), name
            assert "bad_files.jsonl" in str(err.value)  # the message says what to do
    with pytest.raises(MediaError, match="truncated"):
        probe(cases["data-lost"])


def test_media_error_survives_pickling():
    err = pickle.loads(pickle.dumps(MediaError("/x/y.mp4", "no video stream")))
    assert isinstance(err, MediaError) and err.path == "/x/y.mp4" and err.reason == "no video stream"


def test_audio_only_file_is_not_a_video(tmp_path):
    path = make_audio_file(tmp_path / "a.flac", tone(0.5, 48000), 48000)
    with pytest.raises(MediaError, match="no video stream"):
        probe(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of backend='auto'")
def test_auto_backend_without_gpu_is_cpu(tmp_path):
    path = make_clip(tmp_path / "v.webm", num_frames=4, vcodec="vp9")
    assert decode_clip(path, num_frames=2, image_size=32).backend == "cpu"
    np.testing.assert_allclose(mean_rgb(decode_clip(path, num_frames=1, image_size=32).video)[0],
                               frame_color(0), atol=4)


# ---------------------------------------------------------------------------------------------
# one contract, back-ends as siblings
# ---------------------------------------------------------------------------------------------


def test_the_contract_imports_no_backend():
    """media.py is imported by every back-end and imports none of them (no cycle): `decode.py`,
    above them, is the one module that loads them."""
    import ast
    import sys
    from pathlib import Path

    backends = {"nemo_avllm.data.decode_pyav": "nemo_avllm/data/decode_pyav.py",
                "nemo_avllm.data.decode_torchcodec": "nemo_avllm/data/decode_torchcodec.py",
                "nemo_avllm.data.decode_decord": "nemo_avllm/data/decode_decord.py",
                "dali_pipelines": "dali_pipelines/video.py"}
    code = ("import sys, nemo_avllm.media\n"
            "print([m for m in ('av', 'nemo_avllm.data.decode_pyav', 'nemo_avllm.data.decode_torchcodec', "
            "'nemo_avllm.data.decode_decord', 'dali_pipelines', 'torchcodec', 'decord') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    root = Path(media.__file__).resolve().parents[1]
    tree = ast.parse(Path(media.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"av", *backends}, imported
    for path in backends.values():  # and every back-end uses the contract
        assert "from nemo_avllm.media import" in (root / path).read_text(), path
    assert set(decode.BACKENDS) == {"pyav", "torchcodec", "decord", "dali"}


def _fast_decoders() -> list[str]:
    return [name for name in ("torchcodec", "decord") if decode.installed(name)]


@pytest.mark.skipif(not _fast_decoders(), reason="needs torchcodec or decord (pip install 'nemo_avllm[decoders]')")
def test_fast_decoders_return_pyavs_frames(tmp_path):
    """torchcodec and decord give the contract's frames byte for byte (libswscale's RGB, upright,
    sampled over the probe's count), so a cpu run may take each file from the fastest."""
    clips = [make_clip(tmp_path / "g.mp4", num_frames=31, gop=5),
             make_clip(tmp_path / "r.mp4", split_frames(6, 64, 32), rotate=90),
             make_clip(tmp_path / "v.webm", num_frames=12, vcodec="vp9")]
    for path in clips:
        info = probe(path)
        ref, idx, n = decode_video_frames(path, 7)
        for name in _fast_decoders():
            frames, got_idx, got_n = decode.backend_module(name).read_frames(path, 7, info)
            assert (got_idx, got_n) == (idx, n) and frames.dtype == np.uint8, (name, path)
            np.testing.assert_array_equal(frames, ref, err_msg=f"{name} {path.name}")
        frames, _, _ = decode.read_video_frames(path, 7, info)
        np.testing.assert_array_equal(frames, ref)


def test_a_decoder_that_miscounts_falls_back_to_pyav(tmp_path):
    """An edit-list mp4 (5 hidden frames): a decoder that counts them is refused, PyAV answers."""
    src = make_clip(tmp_path / "src.mp4", num_frames=30, gop=10)
    trimmed = trim_copy(src, tmp_path / "trim.mp4", 0.45)
    info = probe(trimmed)
    assert info.num_frames == 25
    ref = decode_video_frames(trimmed, 6)
    for name in _fast_decoders():
        got = decode.read_video_frames(trimmed, 6, info, decoders=(name, "pyav"))
        assert got[1:] == ref[1:], name
        np.testing.assert_array_equal(got[0], ref[0], err_msg=name)
    if decode.installed("decord"):
        with pytest.raises(ValueError, match="decord counts 30 frames"):
            decode.backend_module("decord").read_frames(trimmed, 6, info)


@pytest.mark.skipif(not decode.installed("torchcodec"), reason="needs torchcodec (pip install 'nemo_avllm[decoders]')")
def test_torchcodec_audio_only_where_it_matches_pyav(tmp_path):
    """On FLAC torchcodec returns PyAV's samples exactly; on AAC it keeps the encoder's end padding,
    so the cpu run reads AAC with PyAV and K segments keep their boundaries."""
    tc = decode.backend_module("torchcodec")
    flac = make_audio_file(tmp_path / "a.flac", tone(1.0, 44100, 700, gains=(0.6, 0.2)), 44100)
    np.testing.assert_array_equal(tc.read_audio(flac, 48000), decode_audio(flac, 48000))
    clip = make_clip(tmp_path / "c.mp4", num_frames=10, audio=tone(3.0, 44100, 1000), audio_rate=44100, acodec="aac")
    with pytest.raises(ValueError, match="files only"):
        tc.read_audio(clip, 48000)
    assert len(decode.read_audio(clip, 48000)) == len(decode_audio(clip, 48000)) == 144000
