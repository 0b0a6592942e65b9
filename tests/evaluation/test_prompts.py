"""Prompts are taken from a manifest's conversation by parsing the modality token as training
does (issue 23, point 7): the token line, then the question, every word of it kept."""

from __future__ import annotations

import json

import pytest

from nemo_avllm import modality


@pytest.mark.parametrize("value,tokens,question", [
    ("<AUD>\nWould you call the tone high or low?", ["<AUD>"], "Would you call the tone high or low?"),
    ("<AUD_VIS> Is the dog barking?", ["<AUD_VIS>"], "Is the dog barking?"),
    ("<VIS>\n<AUD>\nWhat do you hear?", ["<VIS>", "<AUD>"], "What do you hear?"),
    ("What happens in <VIS>?", ["<VIS>"], "What happens in ?"),
    ("No token here.", [], "No token here."),
])
def test_split_tokens(value, tokens, question):
    assert modality.split_tokens(value) == (tokens, question)


def _manifest(tmp_path):
    m = tmp_path / "eval.jsonl"
    rows = [{"id": "c0", "video": "videos/c0.mp4", "token": "<VIS>", "family": "colour", "answer": "red",
             "conversations": [{"from": "human", "value": "<VIS>\nWhat colour is the screen?"}]},
            {"id": "c1", "video": "videos/c1.mp4", "token": "<AUD_VIS>", "family": "pitch", "answer": "high",
             "conversations": [{"from": "human", "value": "<AUD_VIS>\nWould you call the tone high or low?"}]}]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


def test_demo_asks_the_whole_question(tmp_path):
    from nemo_avllm.demo.pipeline import held_out_question

    video, question, answer = held_out_question(_manifest(tmp_path))
    assert (video, question, answer) == ((tmp_path / "videos/c1.mp4").resolve(), "Would you call the tone high or low?", "high")
    # the demo's benchmark file uses the same parser
    from nemo_avllm.demo.benchmark import write_music_avqa

    rows = json.loads(write_music_avqa(_manifest(tmp_path), tmp_path / "b").read_text())
    assert [r["question_content"] for r in rows] == ["What colour is the screen?", "Would you call the tone high or low?"]
