"""The paper's ablations as runnable experiments (§4.4): `avllm demo ablation=...` end to end on
tiny data, T and K as plain overrides through cache -> training -> export, the Table 6 vision
configs, and the training-strategy settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_avllm import config
from tests.conftest import REPO
from tests.media_factory import FFMPEG

needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")

# A tiny budget: 8 clips, one step per stage with batches of 4.
TINY = ["num_train=8", "num_eval=2", "progress_bar=false", "num_workers=1",
        *[f"stage{s}.{k}" for s in (1, 2) for k in ("trainer.max_steps=1", "model.micro_batch_size=4",
                                                   "model.global_batch_size=4")]]


def avllm(*args: str, timeout: int = 600) -> str:
    """`avllm TASK ...` in its own process (Lightning and NeMo take over a process's logging)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"avllm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def audio_ablation(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablation")
    avllm("demo", "ablation=audio_encoder", f"out_dir={out}", *TINY)
    return out


@needs_ffmpeg
def test_audio_encoder_ablation_trains_htsat_and_whisper_on_the_same_questions(audio_ablation):
    from nemo_avllm.training import checkpoint
    from nemo_avllm.training.callbacks import read_metrics

    out = audio_ablation
    md = (out / "results.md").read_text()
    assert "### Ablation: audio_encoder" in md and "stage 1: 1 steps, stage 2: 1 steps" in md
    rows = [line for line in md.splitlines() if line.startswith("| tiny_demo")]
    assert [r.split(" | ")[0] for r in rows] == ["| tiny_demo", "| tiny_demo_whisper"]
    results = json.loads((out / "results.json").read_text())
    htsat, whisper = results["tiny_demo"], results["tiny_demo_whisper"]
    assert htsat["counts"] == whisper["counts"] and sum(htsat["counts"].values()) > 0  # the same held-out questions
    for setting, (kind, width) in {"tiny_demo": ("htsat", 128), "tiny_demo_whisper": ("whisper", 32)}.items():
        d = out / "audio_encoder" / setting
        meta = json.loads((d / "features" / "meta.json").read_text())["fields"]
        assert (meta.get("audio_encoder", "htsat"), meta["audio_width"]) == (kind, width)  # HTSAT: the default
        ckpt = Path(results[setting]["checkpoint"])
        assert ckpt.is_relative_to(d / "runs") and checkpoint.load_common(ckpt)["cfg"]["audio"]["type"] == kind
        for stage in (1, 2):  # a real optimizer step on the setting's features
            (m,) = read_metrics(d / "runs" / f"demo_stage{stage}")
            assert m["step"] == 1 and torch.isfinite(torch.tensor(m["reduced_train_loss"])) and m["grad_norm"] > 0
            if stage == 2:
                assert m["samples_A"] + m["samples_AV"] > 0  # the audio tokens were trained on


@needs_ffmpeg
def test_frames_and_segments_are_plain_overrides_through_cache_training_and_export(audio_ablation, tmp_path):
    """T=8, K=3 (the tiny demo model has T=4, K=2): `avllm features`, `avllm train` and
    `avllm export-hf` with nothing but `model.num_frames` / `model.num_audio_segments` set."""
    from nemo_avllm.hf.export_hf import export_hf
    from nemo_avllm.hf.hf_model import AVLLMForConditionalGeneration
    from nemo_avllm.training.feature_cache import build_feature_cache, open_cache

    out = audio_ablation
    enc = out / "audio_encoder" / "tiny_demo" / "encoders"
    model_over = ["num_frames=8", "num_audio_segments=3", f"vision.checkpoint={enc / 'vision.safetensors'}",
                  f"audio.checkpoint={enc / 'audio.safetensors'}"]
    model_cfg = config.load_model("tiny_demo", model_over)
    build_feature_cache(out / "prepared", tmp_path / "features", model_cfg, index=out / "prepared", progress=False)
    cache = open_cache(tmp_path / "features", model_cfg)
    feats = [cache.get(m) for m in cache.index]
    assert {tuple(f["temporal"].shape) for f in feats} == {(8, 32)}
    assert {tuple(f["audio"].shape) for f in feats if "audio" in f} == {(3, 128)}

    avllm("train", "model=tiny_demo", *[f"model.{o}" for o in model_over], "model.allow_random_init=true",
          f"model.tokenizer={out / 'tokenizer'}", f"model.data.train_manifest={out / 'data' / 'stage1.jsonl'}",
          f"model.data.index={out / 'prepared'}", f"model.data.feature_cache={tmp_path / 'features'}",
          "model.data.num_workers=0", "model.micro_batch_size=4", "model.global_batch_size=4",
          "model.seq_length=160", "trainer.devices=1", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
          f"exp_manager.exp_dir={tmp_path / 'runs'}", "name=tk", "exp_manager.create_tensorboard_logger=false")
    (ckpt,) = (tmp_path / "runs" / "tk" / "checkpoints").glob("*-last")
    hf = export_hf(ckpt, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["num_frames"], cfg["num_patches"], cfg["num_audio_segments"]) == (8, 16, 3)
    model = AVLLMForConditionalGeneration.from_pretrained(hf)
    assert tuple(model.proj_audio.weight.shape) == (128, 128) and tuple(model.proj_temporal.weight.shape) == (128, 32)
    ids = torch.tensor([[1, cfg["aud_vis_token_id"], 5, 6]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values_videos=torch.randn(1, 8, 3, 64, 64),
                       audio_values=0.1 * torch.randn(1, 3, 480000)).logits
    assert logits.shape[:2] == (1, 3 + 8 + 16 + 3)  # <AUD_VIS> -> T + N + K positions
    with pytest.raises(ValueError, match="video has 4 frames; this model was trained with T=8"):
        model(input_ids=ids, pixel_values_videos=torch.randn(1, 4, 3, 64, 64), audio_values=torch.zeros(1, 3, 480000))


@pytest.mark.parametrize("vision,width,patches", [("vit_b16", 768, 196), ("vit_l14", 1024, 256), ("vit_h14", 1280, 256)])
def test_vision_encoder_scaling_configs_shape_cache_and_projectors(vision, width, patches, dist1):
    """Table 6: each ViT config is an override (`model/vision=...`): its width and patch count
    reach the cache key, the token layout and the projectors (built on the meta device)."""
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training.feature_cache import model_fields

    model_cfg = config.load_model("tiny", [f"vision={vision}", "num_frames=16"])
    fields = model_fields(model_cfg)
    assert (fields["vision_width"], fields["num_patches"], fields["num_frames"]) == (width, patches, 16)
    model = build_model(model_cfg, meta=True)
    assert (model.layout.num_frames, model.layout.num_patches) == (16, patches)
    assert tuple(model.proj_temporal.linear.weight.shape) == (model_cfg.llm.hidden_size, width)


def test_training_strategy_settings_reach_the_stage_configs(tmp_path):
    """ablation=training_strategy: mat / pt1 / pt2 set model.data.modality_schedule (and the
    phase split) in the stages whose data config has the key; nothing else differs."""
    data_cfg = (REPO / "conf" / "data" / "av_instruct.yaml").read_text()
    if "modality_schedule" not in data_cfg:
        pytest.skip("needs model.data.modality_schedule (branch i10mat)")
    from nemo_avllm.demo import ablation, steps

    cfg = config.load("demo", ["ablation=training_strategy", "ablations.modality_schedule_split=0.25"])
    stages = ablation._stages_with_schedule(cfg)
    assert 2 in stages
    paths = {"stage1": tmp_path / "s1.jsonl", "stage2": tmp_path / "s2.jsonl", "eval": tmp_path / "e.jsonl"}
    seen = {}
    for label, model, model_over, stage_over in ablation.settings(cfg):
        scfg = ablation.setting_cfg(cfg, tmp_path / label, model, model_over, stage_over, tuple(stages))
        s2 = steps.stage_cfg(scfg, 2, tmp_path, paths, str(tmp_path))
        seen[label] = (s2.model.data.modality_schedule, s2.model.data.modality_schedule_split)
        assert s2.model.data.feature_cache == str(tmp_path / label / "features")
    assert seen == {"mat": ("mat", 0.25), "pt1": ("pt1", 0.25), "pt2": ("pt2", 0.25)}


def test_unknown_ablation_is_refused_naming_the_choices():
    from nemo_avllm.demo import ablation
    from nemo_avllm.errors import UserError

    with pytest.raises(UserError, match="ablation='sizes'; expected one of training_strategy, modality, audio_encoder"):
        ablation.settings(config.load("demo", ["ablation=sizes"]))
