"""Where a run's weights come from: a bf16 stage 2 starts exactly from its stage-1 checkpoint
(the optimizer's fp32 master copies are taken after the restore), runs whose weights would stay
random are refused with the key to set, and the default audio encoder loads the public
laion_clap checkpoint layout strictly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.training import checkpoint, restore
from nemo_avllm.training.train import validate
from tests.laion_reference import laion_htsat_module

def _configured(*overrides: str, max_steps: int = 2):
    """An `AVLLMModel` configured in this process as the training entry point configures it
    (bf16 tiny model, micro-batch 2, global batch 4, constant lr)."""
    from nemo_avllm.training.lightning_module import AVLLMModel

    cfg = config.load("stage1_pretrain", [
        "model=tiny", "model.params_dtype=bf16", "model.micro_batch_size=2", "model.global_batch_size=4",
        "model.seq_length=64", "model.optim.warmup_ratio=0", "model.optim.sched=constant",
        "model.data.packing=false", *overrides])  # micro-batches fed straight to megatron's schedule
    model = AVLLMModel(cfg.model)
    model.max_steps_for_schedule = max_steps
    model.configure_model()
    return model


def _global_step(model, forward_only: bool = False) -> float:
    """One global batch of SyntheticData (its first: <VIS>, <AUD>, <AUD_VIS> samples with
    video and audio) as `AVLLMModel.training_step` runs it: megatron DDP, finalize_model_grads,
    the megatron optimizer. Returns the token-averaged loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm.training.step import forward_step
    from tests.training.deterministic_data import SyntheticData

    batches = iter(SyntheticData(seq_length=64).loader(model, 0))
    model.module.zero_grad_buffer()
    model.optimizer.zero_grad()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches, model=[model.module],
                                         num_microbatches=model.num_microbatches, seq_length=64, micro_batch_size=2,
                                         forward_only=forward_only)
    if not forward_only:
        model.optimizer.step()
    return model._reduce_loss(losses)


def _tensors(model) -> dict[str, torch.Tensor]:
    from nemo_avllm.model import parallel_layout

    return {n: t.detach().clone() for n, t in parallel_layout.local_tensors(model.avllm).items()}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, dist1):
    """A bf16 stage-1 model after one step (projectors moved from their initial values; random tiny
    LLM and encoders: allow_random_init), saved as the strategy saves checkpoints."""
    model = _configured("model.allow_random_init=true", "model.trainable=[projectors]")
    initial = _tensors(model)
    _global_step(model)
    weights = _tensors(model)
    assert any(not torch.equal(weights[n], initial[n]) for n in weights if n.startswith("proj_"))
    path = tmp_path_factory.mktemp("stage1") / "ckpt"
    checkpoint.save(path, model.module, model.optimizer, model.common_state())
    return path, weights, _global_step(model, forward_only=True)


def _stage2(ckpt: Path, lr: float):
    # stage 2 proper: no random init allowed; the encoders come from the stage-1 checkpoint
    return _configured(f"model.restore_from='{ckpt}'", "model.trainable=[projectors,llm]", f"model.optim.lr={lr}")


def test_bf16_stage2_at_lr0_keeps_every_restored_weight_bit_identical(stage1):
    path, before, _ = stage1
    model = _stage2(path, lr=0.0)
    assert model.avllm.proj_audio.linear.weight.dtype == torch.bfloat16
    _global_step(model)
    after = _tensors(model)
    assert before.keys() == after.keys()
    moved = {n: float((after[n].float() - before[n].float()).abs().max()) for n in before
             if not torch.equal(after[n], before[n])}
    assert not moved, moved


def test_bf16_stage2_starts_from_the_stage1_model(stage1):
    path, before, stage1_loss = stage1
    lr = 1e-3
    model = _stage2(path, lr=lr)
    assert _global_step(model) == stage1_loss  # the same weights on the same batch
    # one AdamW step from the restored weights moves each by at most lr (plus bf16 rounding);
    # from the optimizer's random master copies they would jump back to random values
    after = _tensors(model)
    for n in before:
        step = (after[n].float() - before[n].float()).abs()
        assert bool((step <= lr * 1.01 + before[n].float().abs() * 2**-7).all()), (n, float(step.max()))
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("proj_"))


# --- refusals ---------------------------------------------------------------------------------


def test_stage2_without_restore_from_is_refused():
    cfg = config.load("stage2_finetune", ["model=tiny", "model.seq_length=1024"])
    with pytest.raises(ValueError, match=r"model.restore_from.*stage 2 starts from the stage-1 checkpoint.*"
                                         r"model.allow_random_init=true"):
        validate(cfg)


def test_stage1_without_an_imported_llm_is_refused():
    cfg = config.load("stage1_pretrain", ["model=tiny"])
    with pytest.raises(ValueError, match=r"avllm import-hf.*model.restore_from=.*model.allow_random_init=true"):
        validate(cfg)
    validate(config.load("stage1_pretrain", ["model=tiny", "model.allow_random_init=true"]))  # on purpose


@pytest.fixture(scope="module")
def llm_only_checkpoint(tmp_path_factory, dist1) -> Path:
    """What `avllm import-hf` writes: the LLM's tensors only."""
    from nemo_avllm.hf.common import empty_model

    path = tmp_path_factory.mktemp("imported") / "ckpt"
    checkpoint.save(path, empty_model(config.load_model("tiny"), llm_only=True))
    return path


@pytest.mark.parametrize("name", ["vision", "audio"])
def test_null_encoder_checkpoint_is_refused(llm_only_checkpoint, name, tmp_path):
    from nemo_avllm.training.feature_cache import build_encoders

    other = "audio" if name == "vision" else "vision"
    (tmp_path / f"{other}.pt").write_bytes(b"")  # the other encoder's file exists (its path is checked first)
    overrides = ["model=tiny", f"model.restore_from={llm_only_checkpoint}", f"model.{other}.checkpoint={tmp_path / other}.pt"]
    cfg = config.load("stage1_pretrain", overrides)
    with pytest.raises(ValueError, match=rf"model.{name}.checkpoint is null.*model.{name}.checkpoint=<.*"
                                         r"model.allow_random_init=true"):
        validate(cfg)
    with pytest.raises(ValueError, match=rf"model.{name}.checkpoint is null"):
        build_encoders(cfg.model)  # `avllm features` too
    # training on cached features builds no encoders: nothing to refuse
    assert restore.plan(config.load("stage1_pretrain", [*overrides, "model.build_encoders=false"]).model).path


def test_imported_llm_restores_with_new_projectors_only_when_they_train(llm_only_checkpoint):
    base = ["model=tiny", f"model.restore_from={llm_only_checkpoint}", "model.allow_random_init=true"]
    plan = restore.plan(config.load("stage1_pretrain", base).model)
    assert plan.path == str(llm_only_checkpoint) and set(plan.allow_missing) == {"proj_", "vision.", "audio."}
    with pytest.raises(ValueError, match=r"holds no projector weights.*start stage 2 from a stage-1 checkpoint"):
        restore.plan(config.load("stage1_pretrain", [*base, "model.trainable=[llm]"]).model)


def test_missing_tensors_are_refused_naming_them(llm_only_checkpoint, dist1):
    from nemo_avllm.model.provider import build_model

    model = build_model(config.load_model("tiny", ["build_encoders=false"]))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"lacks 6 tensors of this model: proj_audio.linear.bias"):
        checkpoint.load(llm_only_checkpoint, model)
    checkpoint.load(llm_only_checkpoint, model, allow_missing=checkpoint.NOT_IN_LLM_CHECKPOINT)


# --- the public CLAP checkpoint -----------------------------------------------------------------


def _laion_clap_file(path: Path, laion_config: str) -> tuple[torch.nn.Module, dict]:
    """laion_clap's own HTSAT audio branch (`create_htsat_model`, as its `CLAP` builds it) for
    `laion_config` (laion_clap's model_configs/<name>.json), random weights, saved as laion_clap's
    training writes a CLAP checkpoint: {"state_dict": {"module.audio_branch.<name>": ...,
    "module.audio_projection.*", "module.text_branch.*", ...}, "epoch": ...}."""
    htsat = laion_htsat_module()  # laion_clap's clap_module/htsat.py, imported offline
    spec = json.loads((Path(htsat.__file__).parent / "model_configs" / f"{laion_config}.json").read_text())
    torch.manual_seed(3)
    branch = htsat.create_htsat_model(SimpleNamespace(**spec["audio_cfg"])).eval()
    with torch.no_grad():  # non-default BatchNorm statistics: they must load too
        branch.bn0.running_mean.normal_(0, 1)
    sd = {f"module.audio_branch.{k}": v for k, v in branch.state_dict().items()}
    width = branch.num_features
    sd.update({"module.audio_projection.0.weight": torch.zeros(512, width), "module.logit_scale_a": torch.ones(()),
               "module.text_branch.embeddings.word_embeddings.weight": torch.zeros(8, 4)})  # not the audio tower's
    torch.save({"epoch": 45, "state_dict": sd}, path)
    return branch, spec["audio_cfg"]


@pytest.mark.parametrize("model_config,laion_config", [
    ("vicuna7b", "HTSAT-tiny"),   # 630k-audioset-best.pt (vicuna13b: the same section, checked below)
    ("audio/htsat_base", "HTSAT-base"),  # laion_clap's HTSAT-base checkpoints
])
def test_audio_config_loads_laion_clap_checkpoint_strictly(tmp_path, model_config, laion_config):
    from dataclasses import replace

    from omegaconf import OmegaConf

    from nemo_avllm.model.encoders import AudioEncoder, AudioEncoderConfig

    if model_config.startswith("audio/"):
        section = OmegaConf.to_container(OmegaConf.load(config.conf_dir() / "model" / f"{model_config}.yaml"))
    else:
        section = OmegaConf.to_container(config.load_model(model_config).audio)
        assert OmegaConf.to_container(config.load_model("vicuna13b").audio) == section
    audio_cfg = AudioEncoderConfig(**section)
    clap, laion_audio = _laion_clap_file(tmp_path / "clap.pt", laion_config)
    for key in ("sample_rate", "clip_samples", "window_size", "hop_size", "mel_bins", "fmin", "fmax", "model_name"):
        assert getattr(audio_cfg, key) == laion_audio[key], key  # the same front end and tower
    enc = AudioEncoder(replace(audio_cfg, checkpoint=str(tmp_path / "clap.pt")))
    want, got = clap.state_dict(), enc.htsat.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert enc.width == audio_cfg.width == clap.num_features


def test_feature_fusion_clap_checkpoint_is_refused_by_name(tmp_path):
    from dataclasses import replace

    from nemo_avllm.model.encoders import AudioEncoder
    from nemo_avllm.model.provider import avllm_config

    cfg = avllm_config(config.load_model("tiny")).audio
    enc = AudioEncoder(cfg)
    sd = {f"module.audio_branch.{k}": v for k, v in enc.htsat.state_dict().items()}
    sd["module.audio_branch.mel_conv2d.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "630k-fusion-best.pt")
    with pytest.raises(ValueError, match="feature-fusion.*630k-audioset-best.pt"):
        AudioEncoder(replace(cfg, checkpoint=str(tmp_path / "630k-fusion-best.pt")))

