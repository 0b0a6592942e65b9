"""The prepare step on real media: index fields, FLAC side-cars, resume, bad-file report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from nemo_avllm.data.decode import decode_clip
from nemo_avllm.data.index import load_index
from nemo_avllm.data.manifest import read_inputs, stable_id
from nemo_avllm.data.prepare import prepare
from nemo_avllm.data.prepare_cli import main
from tests.media_factory import (
    FFMPEG,
    dominant_frequency,
    garbage_file,
    make_audio_file,
    make_clip,
    make_image,
    color_frames,
    tone,
    truncate_copy,
)

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")


@pytest.fixture()
def dataset(tmp_path):
    """A manifest over good, duplicated, audio-less, image, bad and missing media."""
    m = tmp_path / "media"
    m.mkdir()
    make_clip(m / "tone.mp4", num_frames=12, audio=tone(2.0, 44100, 1000, gains=(0.6, 0.2)), audio_rate=44100)
    make_clip(m / "quiet.webm", num_frames=8, vcodec="vp9", audio=tone(1.0, 48000, 500), acodec="opus")
    make_clip(m / "mute.mp4", num_frames=6)
    make_image(m / "still.png", color_frames(3, 40, 30)[2])
    make_audio_file(m / "side.wav", tone(1.5, 22050, 3000), 22050)
    garbage_file(m / "corrupt.mp4")
    truncate_copy(m / "tone.mp4", m / "truncated.mp4", 0.4)
    lines = [
        {"id": "s1", "video": "media/tone.mp4", "conversations": []},
        {"id": "s2", "video": "media/tone.mp4", "conversations": []},  # same video, another sample
        {"id": "s3", "video": str(m / "quiet.webm")},  # absolute path
        {"id": "s4", "video": "media/mute.mp4"},
        {"id": "s5", "video": "media/still.png"},
        {"id": "s6", "video": "media/mute.mp4", "audio": "media/side.wav"},  # separate audio file
        {"id": "s7", "video": "media/corrupt.mp4"},
        {"id": "s8", "video": "media/truncated.mp4"},
        {"id": "s9", "video": "media/missing.mp4"},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, m


def test_prepare_index_side_cars_and_bad_files(dataset, tmp_path):
    manifest, m = dataset
    out = tmp_path / "prep"
    report = prepare(manifest, out, num_workers=2)  # the process-pool path
    assert (report.total, report.prepared, report.skipped, report.failed) == (8, 5, 0, 3)
    assert report.with_audio == 3

    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [os.path.basename(r["path"]) for r in records] == [
        "tone.mp4", "quiet.webm", "mute.mp4", "still.png", "mute.mp4"]  # input order, de-duplicated
    tone_rec, webm_rec, mute_rec, img_rec, side_rec = records
    assert tone_rec["path"] == str(m / "tone.mp4")
    assert tone_rec["id"] == stable_id(str(m / "tone.mp4"))
    for key in ("num_frames", "fps", "duration", "has_audio", "audio_channels", "audio_sample_rate", "width",
                "height", "rotation", "flac"):
        assert key in tone_rec
    assert (tone_rec["num_frames"], tone_rec["width"], tone_rec["height"]) == (12, 64, 48)
    assert tone_rec["fps"] == pytest.approx(10) and tone_rec["duration"] == pytest.approx(1.2)
    assert (tone_rec["has_audio"], tone_rec["audio_channels"], tone_rec["audio_sample_rate"]) == (True, 2, 44100)
    assert webm_rec["num_frames"] == 8 and webm_rec["has_audio"] and webm_rec["audio_codec"] == "opus"
    assert mute_rec["flac"] is None and not mute_rec["has_audio"]
    assert img_rec["is_image"] and img_rec["num_frames"] == 1 and img_rec["flac"] is None
    assert side_rec["audio_path"] == str(m / "side.wav") and side_rec["audio_sample_rate"] == 22050
    assert side_rec["id"] != mute_rec["id"]

    # FLAC side-cars: 48 kHz mono, the whole track, the right content
    for rec, seconds, freq in ((tone_rec, 2.0, 1000), (webm_rec, 1.0, 500), (side_rec, 1.5, 3000)):
        info = sf.info(rec["flac"])
        assert (info.samplerate, info.channels, info.format) == (48000, 1, "FLAC")
        wave, _ = sf.read(rec["flac"], dtype="float32")
        assert len(wave) == pytest.approx(seconds * 48000, abs=1100)  # opus/aac framing
        assert dominant_frequency(wave, 48000) == pytest.approx(freq, abs=3)
        assert rec["audio_seconds"] == pytest.approx(len(wave) / 48000)
    wave, _ = sf.read(tone_rec["flac"], dtype="float32")
    assert np.abs(wave[4800:-4800]).max() == pytest.approx(0.4, rel=0.05)  # mean of 0.6 and 0.2

    bad_lines = (out / "bad_files.jsonl").read_text().splitlines()
    bad = {os.path.basename(b["path"]): b["reason"] for b in map(json.loads, bad_lines)}
    assert set(bad) == {"corrupt.mp4", "truncated.mp4", "missing.mp4"}
    assert "not found" in bad["missing.mp4"]

    # the side-car feeds decode_clip
    clip = decode_clip(tone_rec["path"], audio_path=tone_rec["flac"], num_frames=4, image_size=32, backend="cpu")
    assert clip.has_audio and clip.num_frames == 12


def test_resume_skips_unchanged_and_redoes_changed(dataset, tmp_path):
    manifest, m = dataset
    out = tmp_path / "prep"
    first = prepare(manifest, out, num_workers=1, progress=False)
    assert (first.prepared, first.failed) == (5, 3)
    again = prepare(manifest, out, num_workers=1, progress=False)
    assert (again.prepared, again.skipped, again.failed) == (0, 5, 3)  # bad files are retried
    assert load_index(out) == load_index(out)  # stable
    # a re-encoded file (new size/mtime) is probed again; the others are skipped
    make_clip(m / "mute.mp4", num_frames=9)
    third = prepare(manifest, out, num_workers=1, progress=False)
    assert (third.prepared, third.skipped) == (2, 3)  # mute.mp4 twice: alone and with side.wav
    assert {r["num_frames"] for r in load_index(out) if r["path"].endswith("mute.mp4")} == {9}
    # no resume: everything again
    fresh = prepare(manifest, out, num_workers=1, resume=False, progress=False)
    assert (fresh.prepared, fresh.skipped) == (5, 0)


def test_killed_run_leaves_a_readable_index(dataset, tmp_path):
    manifest, _ = dataset
    out = tmp_path / "prep"
    prepare(manifest, out, num_workers=1, progress=False)
    lines = (out / "index.jsonl").read_text().splitlines()
    # what a kill mid-append leaves: the first two records and half of the third
    (out / "index.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    assert len(load_index(out)) == 2
    report = prepare(manifest, out, num_workers=1, progress=False)
    assert (report.skipped, report.prepared) == (2, 3)
    assert len(load_index(out)) == 5
    assert all(json.loads(line) for line in (out / "index.jsonl").read_text().splitlines())


def test_plain_list_of_paths_and_cli(tmp_path):
    a = make_clip(tmp_path / "a.mp4", num_frames=4, audio=tone(0.5, 16000), audio_rate=16000)
    b = make_clip(tmp_path / "b.mp4", num_frames=4)
    items = read_inputs([a, str(b), a])
    assert [i.video for i in items] == [str(a), str(b)]
    report = prepare([a, b], tmp_path / "out", num_workers=1, progress=False)
    assert (report.prepared, report.with_audio) == (2, 1)
    listing = tmp_path / "list.txt"
    listing.write_text("a.mp4\nb.mp4\n")
    assert main([str(listing), str(tmp_path / "out2"), "--workers", "1"]) == 0
    assert len(load_index(tmp_path / "out2")) == 2


def test_bad_manifest_lines_are_reported_and_the_run_goes_on(tmp_path, capsys, caplog):
    """`avllm prepare` on a manifest with a broken JSON line, a line without video, a missing
    file and good ffmpeg-made clips: exit 0, the good clips indexed, every drop counted."""
    make_clip(tmp_path / "a.mp4", num_frames=4, audio=tone(0.5, 44100), audio_rate=44100)
    make_clip(tmp_path / "b.mp4", num_frames=4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"id": "a", "video": "a.mp4"}\n'
        '{"id": "broken", "video": "a.mp4"\n'  # line 2: not valid JSON
        '{"id": "novideo", "audio": "a.mp4"}\n'  # line 3: no video
        '{"id": "gone", "video": "missing.mp4"}\n'  # a file that is not there
        '{"id": "b", "video": "b.mp4"}\n'
    )
    assert main([str(manifest), str(tmp_path / "prep"), "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert "2 prepared" in summary and "1 bad" in summary and "2 manifest lines dropped" in summary
    assert sorted(os.path.basename(r["path"]) for r in load_index(tmp_path / "prep")) == ["a.mp4", "b.mp4"]
    bad = [json.loads(x) for x in (tmp_path / "prep" / "bad_files.jsonl").read_text().splitlines()]
    lines = {b["line"]: b for b in bad if b["line"] is not None}
    assert set(lines) == {2, 3} and all(b["path"] == str(manifest) for b in lines.values())
    assert "not valid JSON" in lines[2]["reason"] and "Fix:" in lines[2]["reason"]
    assert "'video' is missing" in lines[3]["reason"]
    (gone,) = [b for b in bad if b["line"] is None]
    assert gone["path"].endswith("missing.mp4") and gone["id"] and "not found" in gone["reason"]
    logged = caplog.text
    assert f"{manifest}:2:" in logged and f"{manifest}:3:" in logged  # FILE:LINE, what, fix on the console


_RSS_CHILD = """
import json, resource, sys
from nemo_avllm.data.manifest import MediaItem
from nemo_avllm.data.prepare import prepare_one
video, out, *audios = sys.argv[1:]
growth = []
for k, audio in enumerate(audios):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = prepare_one(MediaItem(video, audio, f"clip{k}"), out)
    assert res["ok"], res
    growth.append([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, res["record"]["audio_seconds"]])
print(json.dumps(growth))
"""


def test_side_car_is_streamed_in_bounded_memory_and_equals_the_whole_track_path(tmp_path):
    """Peak RSS of `prepare_one` does not grow with the track (20 s vs 200 s of 44.1 kHz stereo
    FLAC made by ffmpeg, resampled to 48 kHz): measured in a fresh process after a 1 s warm-up.
    Holding the whole 200 s track (the earlier path) raised the peak by about 100 MB; streaming
    stays within a few MB. The side-car's samples equal those of decoding the whole track and
    writing it at once, exactly: the same decoder and resampler see the same frames."""
    import subprocess
    import sys

    from nemo_avllm.data.decode_pyav import decode_audio
    from tests.media_factory import run_ffmpeg

    video = make_clip(tmp_path / "v.mp4", num_frames=2)
    audios = []
    for seconds in (1, 20, 200):
        audios.append(tmp_path / f"a{seconds}.flac")
        run_ffmpeg(["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}", "-ac", "2",
                    "-c:a", "flac", str(audios[-1])])
    out = tmp_path / "audio"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(video), str(out), *map(str, audios)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (_, _), (grow20, sec20), (grow200, sec200) = json.loads(proc.stdout.splitlines()[-1])
    assert (sec20, sec200) == (20.0, 200.0)
    assert grow200 < 16 * 1024, f"peak RSS grew by {grow200 / 1024:.0f} MB on 200 s of audio (20 s: {grow20 / 1024:.0f} MB)"

    streamed, rate = sf.read(out / "clip1.flac", dtype="int16")
    whole = tmp_path / "whole.flac"  # the earlier path: the whole track in memory, written at once
    sf.write(whole, np.clip(decode_audio(audios[1], 48000), -1.0, 1.0), 48000, format="FLAC", subtype="PCM_16")
    at_once, _ = sf.read(whole, dtype="int16")
    assert rate == 48000 and streamed.shape == at_once.shape == (20 * 48000,)
    assert np.array_equal(streamed, at_once)
