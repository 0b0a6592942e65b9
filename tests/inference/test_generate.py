"""`avllm generate` / `avllm chat` on a tiny AVLLM checkpoint and its Hugging Face export.

The checkpoint holds a tiny model with weights far from init (so logits are not flat and answers
are long). What must hold: megatron-core KV-cache generation equals the no-cache reference
(`greedy_generate`) token for token, batched over prompts of different lengths; the CLI picks the
modality token from the file and answers what the engine answers; a manifest gives one JSONL
prediction per id; the export (transformers `generate`) says the same tokens; chat answers each
turn from the whole conversation with the media encoded once; PP>1 is refused with the way out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nemo_avllm import modality
from tests.conftest import REPO, torchrun
from tests.hf.worker import scale_, tiny_cfg
from tests.media_factory import make_audio_file, make_clip, make_image, tone

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    sound = tone(1.0, 48000, 440.0)
    return {
        "av": make_clip(d / "av.mp4", num_frames=8, audio=sound),
        "silent": make_clip(d / "silent.mp4", num_frames=8),
        "image": make_image(d / "still.png", np.full((48, 64, 3), 200, np.uint8)),
        "audio": make_audio_file(d / "tone.wav", sound),
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, dist1, tokenizer_dir):
    """A tiny AVLLM (encoders included) saved as a dist checkpoint with its config and tokenizer."""
    from nemo_avllm.config import to_dict
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    scale_(model)
    common = to_dict(cfg)
    common["tokenizer"] = str(tokenizer_dir)
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    checkpoint.save(path, model, common={"cfg": common})
    return path


@pytest.fixture(scope="module")
def backend(ckpt):
    from nemo_avllm.inference.backends import MegatronBackend

    return MegatronBackend(ckpt)


def _cfg(**kw):
    from nemo_avllm import config

    over = [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}" for k, v in kw.items()]
    return config.load("generate", over)


def test_modality_comes_from_the_file(media):
    from nemo_avllm.inference.tasks import choose_modality

    assert choose_modality(media["av"]) == modality.AUD_VIS_TOKEN
    assert choose_modality(media["silent"]) == modality.VIS_TOKEN
    assert choose_modality(media["image"]) == modality.VIS_TOKEN
    assert choose_modality(media["audio"]) == modality.AUD_TOKEN
    assert choose_modality(media["av"], "<VIS>") == modality.VIS_TOKEN  # visual-only inference (Fig. 5)
    with pytest.raises(ValueError, match="modality='<VID>'"):
        choose_modality(media["av"], "<VID>")


def test_kv_cache_equals_no_cache_batched(backend, tokenizer):
    """Prompts of different lengths and modalities in one batch: the static KV cache answers
    exactly what re-running the whole sequence every step answers."""
    from nemo_avllm.inference.engine import SamplingConfig
    from nemo_avllm.inference.generate import greedy_generate

    turns = [[{"from": "human", "value": f"<AUD_VIS> {QUESTION}"}],
             [{"from": "human", "value": "<VIS> Describe the sound. Is it synchronous with the motion?"}],
             [{"from": "human", "value": "<AUD> Describe the sound."}]]
    prompts = [backend.prompt(t) for t in turns]
    assert len({len(p) for p in prompts}) == 3
    g = torch.Generator().manual_seed(5)
    lay = backend.layout
    video = torch.randn(3, lay.num_frames, 3, 64, 64, generator=g)
    audio = torch.randn(3, lay.num_audio_segments, backend.decode.window, generator=g)
    want = greedy_generate(backend.model, prompts, video=video, audio=audio, eos_id=tokenizer.eos_token_id, max_new_tokens=12)
    got = backend.generate(prompts, backend.features(prompts, video, audio), SamplingConfig(max_new_tokens=12))
    assert [x.tokens for x in got] == want
    assert all(len(w) >= 6 for w in want), want  # long enough answers for the comparison to mean something
    # sampling: reproducible with its seed, different from greedy
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, seed=7)
    a = backend.generate(prompts, backend.features(prompts, video, audio), s)
    b = backend.generate(prompts, backend.features(prompts, video, audio), s)
    assert [x.tokens for x in a] == [x.tokens for x in b] != want


def test_stop_strings_and_streaming(backend, media):
    from nemo_avllm.inference.engine import SamplingConfig
    from nemo_avllm.inference.tasks import Question, answer_batch, question_turn

    q = Question("0", str(media["av"]), None, [question_turn(QUESTION, modality.AUD_VIS_TOKEN)], modality.AUD_VIS_TOKEN)
    pieces = []
    full = answer_batch(backend, [q], SamplingConfig(max_new_tokens=16), lambda i, p: pieces.append(p))[0]
    # the random model spells some bytes that only later form characters: the stream never
    # contradicts the final text (it is all of it whenever every character was complete)
    streamed = "".join(pieces).strip()
    assert len(pieces) > 1 and full.text.startswith(streamed)
    assert streamed == full.text or "\ufffd" in full.text
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = answer_batch(backend, [q], SamplingConfig(max_new_tokens=16, stop=[stop]))[0]
    assert cut.finish == "stop" and cut.text == full.text[: full.text.index(stop)].strip()


def test_manifest_to_jsonl(backend, ckpt, media, tmp_path):
    from nemo_avllm.inference.tasks import generate

    man = tmp_path / "q.jsonl"
    rows = [{"id": "a", "video": str(media["av"]), "question": QUESTION},
            {"id": "b", "video": str(media["silent"]), "question": QUESTION},
            {"id": "c", "video": str(media["audio"]), "question": "Describe the sound."}]
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pred.jsonl"
    generate(_cfg(checkpoint=str(ckpt), input=str(man), out=str(out), batch_size=2, **{"sampling.max_new_tokens": 6}))
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    assert [p["modality"] for p in preds] == ["<AUD_VIS>", "<VIS>", "<AUD>"]
    assert all(p["answer"] and p["new_tokens"] > 0 for p in preds)


def test_export_generates_the_same_tokens(backend, ckpt, media, tmp_path):
    """transformers `generate` on the export folder = megatron KV-cache generation (greedy)."""
    from nemo_avllm.hf.export_hf import export_hf
    from nemo_avllm.inference.backends import HFBackend
    from nemo_avllm.inference.engine import SamplingConfig
    from nemo_avllm.inference.tasks import Question, answer_batch, question_turn

    hf = HFBackend(export_hf(ckpt, tmp_path / "hf"))
    qs = [Question(str(i), str(media[k]), None, [question_turn(QUESTION if k != "audio" else "Describe it.", t)], t)
          for i, (k, t) in enumerate([("av", "<AUD_VIS>"), ("silent", "<VIS>"), ("audio", "<AUD>")])]
    s = SamplingConfig(max_new_tokens=10)
    want = [g.tokens for g in answer_batch(backend, qs, s)]
    got = [g.tokens for g in answer_batch(hf, qs, s)]
    assert got == want


def _cli(*args, stdin=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "nemo_avllm.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def test_cli_generate_and_chat(backend, ckpt, media):
    """`avllm generate` streams the engine's answer; `avllm chat` driven through stdin answers
    turn 2 from the whole conversation, as generate does for the same conversation."""
    from nemo_avllm.inference.engine import SamplingConfig
    from nemo_avllm.inference.tasks import Question, answer_batch, question_turn

    s = SamplingConfig(max_new_tokens=8)
    first = [question_turn(QUESTION, modality.AUD_VIS_TOKEN)]
    a1 = answer_batch(backend, [Question("0", str(media["av"]), None, first, "")], s)[0].text
    proc = _cli("generate", f"checkpoint={ckpt}", f"input={media['av']}", f"question={QUESTION}",
                "sampling.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == a1
    assert "<AUD_VIS>" in proc.stderr

    turns = first + [{"from": "gpt", "value": a1}, {"from": "human", "value": "And the sound?"}]
    a2 = answer_batch(backend, [Question("0", str(media["av"]), None, turns, "")], s)[0].text
    proc = _cli("chat", f"checkpoint={ckpt}", f"input={media['av']}", "sampling.max_new_tokens=8", "stream=false",
                stdin=f"{QUESTION}\nAnd the sound?\n/quit\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line.split("Assistant: ", 1)[1] for line in proc.stdout.splitlines() if "Assistant: " in line]
    assert answers == [a1, a2]


def test_pipeline_parallel_is_refused_with_the_way_out(ckpt):
    from nemo_avllm.inference.backends import MegatronBackend

    with pytest.raises(NotImplementedError, match="pipeline_model_parallel_size=1.*export-hf"):
        MegatronBackend(ckpt, pipeline_model_parallel_size=2)


def test_tp2_generates_what_tp1_generates(backend, ckpt, tmp_path):
    """The checkpoint loaded at TP=2 (two gloo processes) answers token for token as at TP=1."""
    from nemo_avllm.inference.engine import SamplingConfig

    turns = [[{"from": "human", "value": f"<AUD_VIS> {QUESTION}"}], [{"from": "human", "value": "<VIS> Describe it."}]]
    prompts = [backend.prompt(t) for t in turns]
    g = torch.Generator().manual_seed(11)
    lay = backend.layout
    video = torch.randn(2, lay.num_frames, 3, 64, 64, generator=g)
    audio = torch.randn(2, lay.num_audio_segments, backend.decode.window, generator=g)
    want = [x.tokens for x in backend.generate(prompts, backend.features(prompts, video, audio), SamplingConfig(max_new_tokens=10))]
    torch.save({"prompts": prompts, "video": video, "audio": audio, "max_new_tokens": 10}, tmp_path / "in.pt")
    torchrun(REPO / "tests/inference/tp_worker.py", 2, "--ckpt", str(ckpt), "--inputs", str(tmp_path / "in.pt"),
             "--out", str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text()) == want


def test_checkpoint_without_encoder_weights_needs_them_named(tmp_path, dist1, tokenizer_dir):
    """A model trained on cached features has no encoder weights: refused unless the encoder
    checkpoints are given or random encoders are asked for explicitly."""
    from nemo_avllm.config import to_dict
    from nemo_avllm.inference.backends import MegatronBackend
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    cfg = tiny_cfg(["build_encoders=false"])
    common = to_dict(cfg)
    common["tokenizer"] = str(tokenizer_dir)
    checkpoint.save(tmp_path / "ck", build_model(cfg), common={"cfg": common})
    with pytest.raises(ValueError, match=r"no vision encoder weights.*model.vision.checkpoint.*allow_random_init"):
        MegatronBackend(tmp_path / "ck")
    assert MegatronBackend(tmp_path / "ck", model_overrides={"allow_random_init": True}).model.vision is not None


def test_bad_manifest_lines_name_line_and_field(tmp_path, media):
    from nemo_avllm.inference.tasks import read_manifest

    man = tmp_path / "q.jsonl"
    man.write_text(json.dumps({"id": "a", "video": str(media["av"]), "question": QUESTION}) + "\n"
                   + json.dumps({"id": "b", "question": QUESTION}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: field 'video' is missing"):
        read_manifest(man, "auto")
    man.write_text(json.dumps({"id": "a", "video": str(media["av"])}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: give 'question'"):
        read_manifest(man, "auto")
    man.write_text(json.dumps({"id": "a", "video": str(media["av"]), "question": "Which colour?"}) + "\n")
    assert read_manifest(man, "auto")[0].turns == [{"from": "human", "value": "<AUD_VIS> Which colour?"}]
