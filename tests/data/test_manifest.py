"""Manifest validation on real media: every problem is reported with file, line, field and fix."""

from __future__ import annotations

import json
import os

import pytest

from nemo_avllm import modality
from nemo_avllm.data.manifest import ManifestError, read_inputs, stable_id
from nemo_avllm.data.manifest_checks import validate_manifest
from nemo_avllm.data.prepare import prepare
from tests.media_factory import conv, FFMPEG, color_frames, garbage_file, make_audio_file, make_clip, make_image, tone

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")

LAYOUT = modality.TokenLayout(4, 16, 2)  # the tiny model's T, N, K



@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    make_clip(d / "av.mp4", num_frames=6, audio=tone(1.0, 48000, 440))
    make_clip(d / "mute.mp4", num_frames=6)
    make_image(d / "still.png", color_frames(1, 32, 32)[0])
    make_audio_file(d / "side.wav", tone(1.0, 48000, 880))
    garbage_file(d / "corrupt.mp4")
    return d


def write(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def line(i, video, turns, **kw):
    return {"id": f"s{i}", "video": video, "conversations": turns, **kw}


def test_good_samples_modality_classes_and_media_ids(tmp_path, media):
    path = write(tmp_path, [
        line(0, str(media / "mute.mp4"), conv("<VIS> What colour?", "Red.")),
        line(1, str(media / "av.mp4"), conv("<AUD> What sound?", "A tone.")),
        line(2, str(media / "av.mp4"), conv("<AUD_VIS> Describe.", "A red frame and a tone.")),
        line(3, str(media / "av.mp4"), conv("<VIS> Colour?", "Red.", "<AUD> Sound?", "A tone.")),
        line(4, str(media / "still.png"), conv("<VIS> Describe the image.", "A square.")),
        line(5, "../" + media.name + "/mute.mp4", conv("<AUD> Sound?", "A high tone."), audio=str(media / "side.wav")),
        "# a comment line",
        "",
    ])
    samples, report = validate_manifest(path)
    assert report.ok and (report.lines, report.kept, report.dropped) == (6, 6, 0)
    assert [s.modality for s in samples] == ["V", "A", "AV", "AV", "V", "A"]
    assert report.modalities == {"V": 2, "A": 2, "AV": 2}
    assert samples[5].video == str((media / "mute.mp4").resolve())  # relative to the manifest's folder
    assert samples[5].audio == str(media / "side.wav") and samples[5].has_audio
    assert samples[5].media_id == stable_id(samples[5].video, samples[5].audio)  # the prepare index key
    assert samples[1].has_audio and samples[0].has_audio is None  # visual-only: not probed
    assert (samples[3].file, samples[3].line) == (str(path), 4)


CASES = [
    # (manifest line, code, field, words in the message, words in the fix)
    ('{"id": "x", "video": "a.mp4", "conversations": [', "invalid_json", "<line>", ["not valid JSON"], ["JSON Lines"]),
    ('["a", "list"]', "invalid_json", "<line>", ["not an object"], ['"id"']),
    ({"id": "x", "video": "{mute}"}, "missing_field", "conversations", ["'conversations' is missing"], ["from"]),
    ({"id": "x", "conversations": conv("<VIS>", "a")}, "missing_field", "video", ["'video' is missing"], ["path"]),
    ({"id": "x", "video": "{mute}", "conversations": "hi"}, "invalid_field", "conversations", ["str"], ["list"]),
    ({"id": "x", "video": "nowhere.mp4", "conversations": conv("<VIS> a", "b")}, "missing_media", "video",
     ["nowhere.mp4", "does not exist"], ["fix the path"]),
    ({"id": "x", "video": "{mute}", "audio": "gone.wav", "conversations": conv("<AUD> a", "b")}, "missing_media",
     "audio", ["gone.wav"], ["fix the path"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("<IMG> What is it?", "A cat.")}, "unknown_token",
     "conversations[0].value", ["<IMG>"], ["replace <IMG> by <VIS>"]),
    ({"id": "x", "video": "{av}", "conversations": conv("Hi", "Yes", "<AUDIO> and?", "A dog.")}, "unknown_token",
     "conversations[2].value", ["<AUDIO>"], ["replace <AUDIO> by <AUD>"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("<image> What?", "A cat.")}, "unknown_token",
     "conversations[0].value", ["<image>"], ["<VIS>"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("<AUD> What sound?", "None.")}, "no_audio",
     "conversations", ["mute.mp4 has no audio"], ["use <VIS>"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("<AUD_VIS> Describe.", "Red.")}, "no_audio",
     "conversations", ["no audio"], ["'audio' file"]),
    ({"id": "x", "video": "{mute}", "conversations": []}, "empty_conversation", "conversations", ["empty"],
     ["at least one human turn"]),
    ({"id": "x", "video": "{mute}", "conversations": [{"from": "human", "value": "<VIS> a"},
                                                      {"from": "human", "value": "b"}]},
     "bad_turns", "conversations[1]", ["role 'human' where 'gpt' was expected"], ["alternate"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("<VIS> a", "b <VIS>")}, "bad_turns", "conversations[1]",
     ["modality tokens belong in human turns"], ["move the modality token"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("<VIS> a", "b", "c")}, "bad_turns", "conversations[2]",
     ["ends with a human turn"], ["end with a gpt turn"]),
    ({"id": "x", "video": "{mute}", "conversations": conv("What?", "Red.")}, "no_modality_token", "conversations",
     ["no modality token"], ["<VIS>"]),
    ({"id": "x", "video": "{corrupt}", "conversations": conv("<AUD> What?", "Noise.")}, "bad_media", "video",
     ["corrupt.mp4"], ["re-encode"]),
]


@pytest.mark.parametrize("text,code,field,words,fix_words", CASES, ids=[c[1] + f"-{i}" for i, c in enumerate(CASES)])
def test_each_problem_names_file_line_field_and_fix(tmp_path, media, text, code, field, words, fix_words):
    if isinstance(text, dict):
        text = json.loads(json.dumps(text).replace("{mute}", str(media / "mute.mp4"))
                          .replace("{av}", str(media / "av.mp4")).replace("{corrupt}", str(media / "corrupt.mp4")))
    good = line(0, str(media / "mute.mp4"), conv("<VIS> a", "b"))
    path = write(tmp_path, [good, text, good])
    samples, report = validate_manifest(path)
    assert len(samples) == 2 and report.dropped == 1 and dict(report.counts) == {code: 1}
    msg = report.examples[code][0]
    assert msg.startswith(f"{path}:2: field '{field}': "), msg
    what, fix = msg.split(". Fix: ")
    for w in words:
        assert w in what, msg
    for w in fix_words:
        assert w in fix, msg
    with pytest.raises(ManifestError) as e:
        validate_manifest(path, strict=True)
    assert e.value.problem.line == 2 and e.value.problem.code == code and str(e.value) == msg


def test_report_counts_every_problem_and_keeps_going(tmp_path, media):
    mute, av = str(media / "mute.mp4"), str(media / "av.mp4")
    lines = [line(0, mute, conv("<VIS> a", "b"))]
    lines += ["{broken"] * 4
    lines += [line(i, mute, conv("<IMG> a", "b")) for i in range(5)]
    lines += [line(i, av, conv("<AUD> a", "b")) for i in range(3)]
    path = write(tmp_path, lines)
    samples, report = validate_manifest(path)
    assert (report.lines, report.kept, report.dropped) == (13, 4, 9)
    assert report.counts == {"invalid_json": 4, "unknown_token": 5}
    assert len(report.examples["unknown_token"]) == 3  # first examples only
    assert [e.split(":")[1] for e in report.examples["invalid_json"]] == ["2", "3", "4"]
    text = str(report)
    assert "unknown_token: 5" in text and "4 dropped" not in text and "9 dropped" in text
    with pytest.raises(ManifestError, match=r":2: field '<line>'"):
        validate_manifest(path, strict=True)


def test_too_long_truncate_vs_drop(tmp_path, media, tokenizer):
    av = str(media / "av.mp4")
    short = line(0, av, conv("<AUD_VIS> Describe.", "Red."))
    long_answer = line(1, av, conv("<AUD_VIS> Describe.", "the red circle moves left " * 30))
    long_prompt = line(2, av, conv("<VIS> " + "the blue square moves up " * 40, "Yes."))
    path = write(tmp_path, [short, long_answer, long_prompt])
    n_short = validate_manifest(path, tokenizer=tokenizer, layout=LAYOUT)[0][0].num_tokens
    max_len = n_short + 40

    samples, rep = validate_manifest(path, tokenizer=tokenizer, layout=LAYOUT, max_length=max_len, policy="truncate")
    assert [s.id for s in samples] == ["s0", "s1"]
    assert (rep.kept, rep.truncated, rep.dropped) == (2, 1, 1) and rep.counts == {"too_long": 1}
    assert samples[1].num_tokens == max_len
    assert "first prompt alone exceeds" in rep.examples["too_long"][0] and ":3:" in rep.examples["too_long"][0]

    samples, rep = validate_manifest(path, tokenizer=tokenizer, layout=LAYOUT, max_length=max_len, policy="drop")
    assert [s.id for s in samples] == ["s0"]
    assert (rep.kept, rep.truncated, rep.dropped) == (1, 0, 2) and rep.counts == {"too_long": 2}
    assert "max_length_policy=truncate" in rep.examples["too_long"][0]
    with pytest.raises(ValueError, match="max_length_policy"):
        validate_manifest(path, policy="cut")


def test_prepare_index_gives_has_audio_and_explains_bad_files(tmp_path, media):
    mute, av, corrupt = str(media / "mute.mp4"), str(media / "av.mp4"), str(media / "corrupt.mp4")
    lines = [line(0, av, conv("<AUD> a", "b")), line(1, mute, conv("<VIS> a", "b")),
             line(2, corrupt, conv("<VIS> a", "b")), line(3, mute, conv("<AUD> a", "b"))]
    path = write(tmp_path, lines)
    prepare(path, tmp_path / "prep", num_workers=1, progress=False)
    late = write(tmp_path, lines + [line(4, str(media / "still.png"), conv("<VIS> a", "b"))], "late.jsonl")
    samples, rep = validate_manifest(late, index=tmp_path / "prep")
    assert [s.id for s in samples] == ["s0", "s1"]
    assert samples[0].has_audio is True and samples[1].has_audio is False  # from the index, for every sample
    assert rep.counts == {"bad_media": 2, "no_audio": 1}
    bad = rep.examples["bad_media"]
    assert bad[0].startswith(f"{late}:3: field 'video': prepare could not read it")
    assert ":5: field 'video'" in bad[1] and "not in the prepare index" in bad[1] and "rerun `avllm prepare`" in bad[1]
    with pytest.raises(FileNotFoundError, match="avllm prepare"):
        validate_manifest(late, index=tmp_path / "nothing")


def test_views_are_validated_and_used_for_derived_views(tmp_path, media):
    av, mute = str(media / "av.mp4"), str(media / "mute.mp4")
    views = {"V": conv("<VIS> What do you see?", "A red frame."), "A": conv("<AUD> What do you hear?", "A tone."),
             "AV": conv("<AUD> wrong token", "x")}
    path = write(tmp_path, [line(0, av, conv("<AUD_VIS> Describe.", "A red frame and a tone."), views=views),
                            line(1, mute, conv("<VIS> a", "b"), views={"A": conv("<AUD> a", "b")}),
                            line(2, av, conv("<VIS> Colour?", "Red.", "<AUD> Sound?", "A tone.")),
                            line(3, mute, conv("<VIS> a", "b"), views={"A": conv("<VIS> wrong token", "x")})])
    samples, rep = validate_manifest(path)
    assert rep.kept == 4 and rep.counts == {"bad_view": 3}
    assert (f"{path}:1: field 'views.AV': view AV is the modality of the sample's own conversation. "
            f"Fix: remove views.AV") in rep.examples["bad_view"][0]
    assert ":2: field 'views.A'" in rep.examples["bad_view"][1] and "needs audio" in rep.examples["bad_view"][1]
    assert ":4: field 'views.A': view A uses the tokens of modality V" in rep.examples["bad_view"][2]
    s0, s1, s2, _ = samples
    assert set(s0.views) == {"V", "A"} and s1.views is None
    assert s0.available_views(derive=False) == ["AV"] and s0.available_views(derive=True) == ["V", "A", "AV"]
    assert s1.available_views(derive=True) == ["V"]
    assert s0.conversation("V") == views["V"] and s0.conversation("AV") == s0.conversations
    # no per-view conversation, no other view: tokens are never rewritten over an AV answer
    assert s2.available_views(derive=True) == ["AV"]
    with pytest.raises(KeyError, match=r"no 'V' conversation; give one in the manifest's 'views'"):
        s2.conversation("V")
    with pytest.raises(ManifestError, match="views.AV"):
        validate_manifest(path, strict=True)


def test_read_inputs_leaves_out_and_reports_bad_lines(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"video": "a.mp4"}\n{"audio": "x.wav"}\n{"video": 3}\n')
    problems = []
    assert [os.path.basename(i.video) for i in read_inputs(bad, problems)] == ["a.mp4"]
    assert [(p.line, p.field, p.code) for p in problems] == [(2, "video", "missing_field"), (3, "video", "invalid_field")]
    assert str(problems[0]).startswith(f"{bad}:2: field 'video'") and "Fix: add 'video'" in str(problems[0])
    with pytest.raises(FileNotFoundError):
        read_inputs(tmp_path / "nope.jsonl")
