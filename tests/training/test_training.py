"""Stage freezing, optimizer, config validation and resharded resume of the training stack."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.cli import quote_override
from nemo_avllm.errors import UserError
from nemo_avllm.training import optim
from nemo_avllm.training.train import validate
from tests.training import helpers


def _one_step(model_cfg, trainable):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training.step import forward_step
    from tests.training.deterministic_data import SyntheticData

    torch.manual_seed(0)
    model = build_model(model_cfg)
    counts = optim.freeze_for_stage(model, trainable)
    ddp = optim.wrap_ddp(model, use_distributed_optimizer=False)
    cfg = config.load("stage1_pretrain", ["model=tiny"]).model
    opt = optim.build_optimizer(ddp, cfg.optim, torch.float32, use_distributed_optimizer=False)
    data = SyntheticData(seq_length=64)
    from nemo_avllm.data.collate import collate_tokens

    items = [data.sample(i, model.layout) for i in range(3)]
    batch = collate_tokens([it["tokens"] for it in items], seq_length=64)
    batch["video"] = torch.stack([it["video"] for it in items])
    batch["audio"] = torch.stack([it["audio"] for it in items])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp],
                                num_microbatches=1, seq_length=64, micro_batch_size=3, forward_only=False)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    with_state = {id(p) for o in getattr(opt, "chained_optimizers", [opt]) for p, st in o.optimizer.state.items() if st}
    stateful = {n for n, p in model.named_parameters() if id(p) in with_state}
    return model, counts, changed, stateful


@pytest.mark.parametrize("stage,trainable", [(1, ["projectors"]), (2, ["projectors", "llm"])])
def test_stage_freezing_decides_gradients_and_optimizer_state(dist1, stage, trainable):
    model, counts, changed, stateful = _one_step(config.load_model("tiny"), trainable)
    names = {n for n, _ in model.named_parameters()}
    projectors = {n for n in names if n.startswith("proj_")}
    llm = {n for n in names if n.startswith("llm.")}
    expected = projectors | (llm if stage == 2 else set())
    assert changed == expected
    assert stateful == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert all(not n.startswith(("vision.", "audio.")) for n in changed)
    assert counts["projectors"] == sum(p.numel() for n, p in model.named_parameters() if n in projectors)
    assert counts["llm"] == (0 if stage == 1 else sum(p.numel() for n, p in model.named_parameters() if n in llm))


def test_adamw_betas_schedule_and_warmup_from_config():
    cfg = config.load("stage1_pretrain")
    assert list(cfg.model.optim.betas) == [0.9, 0.98] and cfg.model.optim.lr == 2e-3
    assert cfg.model.global_batch_size == 256 and cfg.trainer.max_epochs == 3 and cfg.model.trainable == ["projectors"]
    s2 = config.load("stage2_finetune", ["model.restore_from=/x"])
    assert s2.model.optim.lr == 2e-5 and s2.model.global_batch_size == 128 and s2.trainer.max_epochs == 1
    assert list(s2.model.trainable) == ["projectors", "llm"] and s2.model.num_frames == 32
    assert s2.model.num_audio_segments == 4 and s2.model.optim.warmup_ratio == 0.03
    assert optim.warmup_steps(1000, 0.03) == 30


def test_cosine_schedule_with_warmup(dist1):
    from nemo_avllm.model.provider import build_model

    model = build_model(config.load_model("tiny"))
    optim.freeze_for_stage(model, ["projectors"])
    ddp = optim.wrap_ddp(model, False)
    ocfg = config.load("stage1_pretrain", ["model=tiny", "model.optim.lr=1.0"]).model.optim
    opt = optim.build_optimizer(ddp, ocfg, torch.float32, False)
    sched = optim.build_scheduler(opt, ocfg, max_steps=100)
    lrs = []
    for _ in range(100):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1 / 3)  # warm-up over ceil(0.03 * 100) = 3 steps
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[51] == pytest.approx(0.5, abs=0.02)  # cosine half-way
    assert lrs[-1] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("max_steps,ratio,warmup", [(1, 0.03, 0), (2, 0.5, 1), (3, 0.99, 2), (1000, 0.03, 30)])
def test_warm_up_stays_below_the_step_count(max_steps, ratio, warmup):
    assert optim.warmup_steps(max_steps, ratio) == warmup


def test_a_one_step_run_has_a_schedule(dist1):
    """trainer.max_steps=1: megatron's scheduler asserts warm-up < decay steps; the clamp makes
    the single step train at the full learning rate."""
    from nemo_avllm.model.provider import build_model

    model = build_model(config.load_model("tiny"))
    optim.freeze_for_stage(model, ["projectors"])
    ocfg = config.load("stage1_pretrain", ["model=tiny", "model.optim.lr=0.5"]).model.optim
    opt = optim.build_optimizer(optim.wrap_ddp(model, False), ocfg, torch.float32, False)
    optim.build_scheduler(opt, ocfg, max_steps=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.tensor_model_parallel_size=3"], "must divide num_attention_heads"),
        (["trainer.devices=8", "model.global_batch_size=12", "model.micro_batch_size=2"], "not divisible by model.micro_batch_size"),
        (["trainer.devices=3", "model.tensor_model_parallel_size=2"], "not divisible by tensor_model_parallel_size"),
        (["trainer.precision=bf16-mixed"], "model.params_dtype"),
        (["model.seq_length=8192"], "max_position_embeddings"),
        (["model.nan_policy=ignore"], "nan_policy"),
        (["model.micro_batch_size=2.5"], r"model.micro_batch_size=2.5 is not valid: give a whole number >= 1"),
        (["model.optim.lr=1e-4", "model.optim.min_lr=1e-3"], r"model.optim.min_lr=0.001 is above model.optim.lr"),
        (["model.optim.betas=[0.9]"], r"model.optim.betas=\[0.9\] is not valid: give two numbers in \[0, 1\)"),
        (["model.optim.warmup_ratio=1.0"], r"model.optim.warmup_ratio=1.0 is not valid"),
        (["trainer.devices=two"], r"trainer.devices='two' is not valid"),
        (["model.restore_from=/no/such/run--step=2-last"], r"model.restore_from=/no/such/run--step=2-last: no such file"),
        (["model.max_consecutive_skipped_steps=-1"], "max_consecutive_skipped_steps"),
        (["model.data.validation_manifest=/v.jsonl", "trainer.val_check_interval=0.5"], "val_check_interval"),
        (["model.data.validation_manifest=/v.jsonl", "trainer.val_check_interval=3"], "not a multiple of trainer.val_check_interval"),
        (["trainer.gpu_memory_gib=24"], r"predicted .* GiB per GPU .* exceeds the GPU's 24.0+ GiB"),
    ],
)
def test_config_is_validated_before_any_work(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(config.load("stage1_pretrain", [quote_override(o) for o in overrides]))


def test_every_key_can_be_overridden_from_the_command_line():
    cfg = config.load("stage2_finetune", ["model=tiny", "model.restore_from=/ckpt", "trainer.devices=2",
                                          "exp_manager.name=x", "model.llm.num_layers=2", "model.data.derive_views=true"])
    assert cfg.model.restore_from == "/ckpt" and cfg.trainer.devices == 2 and cfg.exp_manager.name == "x"
    assert cfg.model.llm.num_layers == 2 and cfg.model.data.derive_views is True


@pytest.mark.distributed
def test_checkpoint_saved_at_tp2_resumes_at_pp2(tmp_path):
    import signal

    tp2 = {"trainer.devices": 2, "model.tensor_model_parallel_size": 2}
    pp2 = {"trainer.devices": 2, "model.pipeline_model_parallel_size": 2}
    # uninterrupted TP=2 reference
    helpers.run(helpers.overrides(tmp_path / "ref", steps=8, every=1000, **tp2), nproc=2)
    ref = helpers.losses_by_step(tmp_path / "ref" / "run")
    # the same run at TP=2, stopped by SIGTERM (final checkpoint), resumed at TP=1 / PP=2
    proc = helpers.start(helpers.overrides(tmp_path / "b", steps=8, every=1000, **tp2), nproc=2)
    helpers.wait_for_step(tmp_path / "b" / "run", 3, proc)
    helpers.kill(proc, signal.SIGTERM)
    stopped = max(helpers.losses_by_step(tmp_path / "b" / "run"))
    assert stopped < 8
    _, out = helpers.run(helpers.overrides(tmp_path / "b", steps=8, every=1000, **pp2), nproc=2)
    assert "Resuming training from checkpoint" in out
    got = helpers.losses_by_step(tmp_path / "b" / "run")
    assert sorted(got) == list(range(stopped + 1, 9))
    for step in got:
        assert got[step] == pytest.approx(ref[step], abs=1e-5)


def test_a_feature_cache_made_for_another_layout_is_refused_before_training(tmp_path):
    from nemo_avllm.data.prepare import prepare
    from nemo_avllm.demo import clips
    from nemo_avllm.training.feature_cache import build_feature_cache

    paths = clips.generate(tmp_path / "d", 2, 0, seed=5)
    prepare(str(paths["clips"]), tmp_path / "prep", num_workers=1, progress=False)
    build_feature_cache(tmp_path / "prep", tmp_path / "cache", config.load_model("tiny", ["allow_random_init=true"]), index=tmp_path / "prep",
                        dtype="fp32", progress=False)
    ok = config.load("stage1_pretrain", ["model=tiny", "model.allow_random_init=true",
                                         f"model.data.feature_cache={tmp_path / 'cache'}"])
    validate(ok)  # same encoders, T, K: accepted
    bad = config.load("stage1_pretrain", ["model=tiny", "model.num_frames=8", f"model.data.feature_cache={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="num_frames|T"):
        validate(bad)
