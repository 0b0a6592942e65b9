"""`export-hf` with the Whisper audio encoder: audio/ is a plain transformers `WhisperEncoder`
folder, the exported model gives the training model's logits with all three modality tokens, and
export -> import (model.audio.checkpoint=<export>/audio) gives back the exact encoder weights."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import nemo_avllm.hf  # noqa: F401  (registers the Auto classes)
from nemo_avllm.hf import hf_model
from tests.hf.worker import av_batch, scale_, tiny_cfg

TOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dist1, tokenizer_dir):
    from nemo_avllm.config import to_dict
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    d = tmp_path_factory.mktemp("whisper_export")
    cfg = tiny_cfg(["audio=whisper_test"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    scale_(model, prefixes=("llm.", "proj_", "audio.whisper.layers.0."))  # the encoder far from init, too
    common = to_dict(cfg)
    common["tokenizer"] = str(tokenizer_dir)
    checkpoint.save(d / "ckpt", model, common={"cfg": common})
    batch = av_batch(model.layout, cfg.llm.vocab_size, audio_samples=cfg.audio.clip_samples)
    with torch.no_grad():
        logits = model(batch["input_ids"], video=batch["video"], audio=batch["audio"], runtime_gather_output=True)
    return {"dir": d, "model": model, "batch": batch, "logits": logits}


@pytest.fixture(scope="module")
def exported(trained):
    from nemo_avllm.hf.export_hf import export_hf

    return export_hf(trained["dir"] / "ckpt", trained["dir"] / "hf")


def test_export_gives_megatron_logits(trained, exported):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    assert hf_model.is_whisper(model.config)
    b = trained["batch"]
    ids = torch.tensor([hf_model.from_placeholder_ids(r, model.config) for r in b["input_ids"].tolist()])
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values_videos=b["video"], audio_values=b["audio"]).logits
    diff = (got - trained["logits"]).abs().max().item()
    print(f"Whisper export: max |HF - megatron| = {diff:.2e}")
    assert got.shape == trained["logits"].shape and diff <= TOL


def test_audio_folder_is_a_plain_whisper_encoder_and_round_trips_exactly(trained, exported):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from nemo_avllm.model.encoders import build_audio_encoder

    config = json.loads((exported / "audio" / "config.json").read_text())
    assert config["model_type"] == "whisper" and config["architectures"] == ["WhisperEncoder"]
    assert (config["d_model"], config["encoder_layers"], config["max_source_positions"]) == (32, 2, 100)
    _, info = WhisperEncoder.from_pretrained(exported / "audio", output_loading_info=True)
    assert not any(info.values()), info
    m = trained["model"]
    back = build_audio_encoder(replace(m.cfg.audio, checkpoint=str(exported / "audio")))  # import
    mine, theirs = back.state_dict(), m.audio.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    top = json.loads((exported / "config.json").read_text())
    assert (top["sample_rate"], top["clip_samples"], top["num_audio_segments"]) == (16000, 32000, 2)


def test_save_pretrained_round_trip(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(exported).save_pretrained(tmp_path / "again")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "again").audio_tower.state_dict()
    b = AutoModelForCausalLM.from_pretrained(exported).audio_tower.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
