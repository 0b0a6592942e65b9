"""The memory plan: exact parameter counts of the 7B layout per rank, how each component moves
with DP, TP, PP, recompute and the stage, the pre-flight refusal, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.training import memory_plan as mp
from tests.conftest import REPO

VICUNA7B_LLM = 6_738_415_616  # LLaMA-2 7B / Vicuna-7B v1.5
PROJECTORS = 4096 * (1024 + 1024 + 768) + 3 * 4096  # W_t, W_s (ViT-L/14 width 1024), W_a (HTSAT-tiny 768), biases
VIT_L14_VISUAL = 303_966_208  # open_clip ViT-L-14 visual tower


@pytest.fixture(scope="module")
def stage1():
    return config.load("stage1_pretrain")


@pytest.fixture(scope="module")
def stage2():
    return config.load("stage2_finetune")


def _plan(cfg, dp=8, **changes):
    return mp.plan(cfg.model, mp.layout_of(cfg, dp, **changes))


def test_inventory_has_the_published_7b_counts(stage2):
    inv = mp.inventory(stage2.model)
    assert inv.llm_params() == VICUNA7B_LLM
    assert sum(inv.projectors) == PROJECTORS
    assert len(inv.layers) == 32 and inv.param_bytes == 2 and inv.encoder_bytes == 2
    assert inv.encoders > VIT_L14_VISUAL  # + the HTSAT-tiny audio tower
    # replicated per layer: the two RMSNorm weights only
    assert all(rep == 2 * 4096 for _, rep in inv.layers)


def test_tp2_holds_half_of_the_split_parameters(stage2):
    inv = mp.inventory(stage2.model)
    one, two = _plan(stage2, dp=8, tp=1), _plan(stage2, dp=4, tp=2)
    assert one.weights == (VICUNA7B_LLM + PROJECTORS) * 2
    groups = [inv.embedding, *inv.layers, inv.final_norm, inv.output, inv.projectors]
    assert two.weights == sum(split / 2 + rep for split, rep in groups) * 2
    assert 0.5 < two.weights / one.weights < 0.501  # norms are the only replicated weights
    assert two.gradients == two.weights * 2  # fp32 grads of every bf16 weight in stage 2


def test_pipeline_stage0_holds_its_layers_embedding_projectors_and_encoders(stage2):
    inv = mp.inventory(stage2.model)
    p = _plan(stage2, pp=2)
    half = sum(s + r for s, r in inv.layers[:16])
    assert p.stage == 0  # two micro-batches in flight, the encoders, the projectors
    assert p.weights == (half + sum(inv.embedding) + PROJECTORS) * 2
    assert p.encoders == inv.encoders * 2
    assert _plan(stage2, pp=2, encoders=False).encoders == 0


def test_optimizer_state_is_sharded_by_dp_with_the_distributed_optimizer(stage2):
    dp8, dp4 = _plan(stage2, dp=8), _plan(stage2, dp=4)
    assert dp4.optimizer == pytest.approx(2 * dp8.optimizer)
    assert dp8.optimizer == pytest.approx((VICUNA7B_LLM + PROJECTORS) * 12 / 8)
    assert dp4.gradients == dp8.gradients  # the grad buffer is not sharded
    plain = _plan(stage2, dp=8, distributed_optimizer=False)
    assert plain.optimizer == pytest.approx(8 * dp8.optimizer)


def test_recompute_lowers_activations(stage1, stage2):
    for cfg in (stage1, stage2):
        on, off = _plan(cfg, recompute=True), _plan(cfg, recompute=False)
        assert on.activations == on.activations_recompute < off.activations == off.activations_no_recompute
        assert on.total < off.total
    # full recompute keeps each layer's input (2sbh bytes) and one layer at a time
    p = _plan(stage2, recompute=True)
    assert p.activations_recompute < p.activations_no_recompute / 5


def test_stage1_trains_the_projectors_only(stage1, stage2):
    s1, s2 = _plan(stage1), _plan(stage2)
    assert s1.gradients == PROJECTORS * 4
    assert s1.optimizer == pytest.approx(PROJECTORS * 12 / 8)
    assert s2.gradients == (VICUNA7B_LLM + PROJECTORS) * 4
    # a frozen LLM keeps no inputs for weight gradients: fewer activations at the same shape
    same = dict(micro_batch=4, seq_length=2048, recompute=False)
    assert _plan(stage1, **same).activations < _plan(stage2, **same).activations


def test_flash_attention_drops_the_quadratic_term(stage2):
    flash, unfused = _plan(stage2, recompute=False), _plan(stage2, recompute=False, flash_attention=False)
    s, b, a = 2048, 4, 32
    # 2 bytes x heads x s^2 x b per layer (softmax probabilities), 32 layers
    assert unfused.activations - flash.activations == pytest.approx(32 * 2 * a * s * s * b)


def test_check_fits_refuses_stage2_tp1_on_40gib_naming_the_numbers(stage2):
    with pytest.raises(ValueError) as err:
        mp.check_fits(stage2, 8, 40 * mp.GIB)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"predicted {_plan(stage2).total / mp.GIB:.1f} GiB per GPU" in msg
    assert "exceeds the GPU's 40.0 GiB" in msg and "gradients 25.1" in msg and "TP1 PP1 DP8" in msg
    assert "model.tensor_model_parallel_size" in msg and "model.micro_batch_size" in msg


def test_check_fits_accepts_what_fits(stage2):
    tp2 = config.load("stage2_finetune", ["model.tensor_model_parallel_size=2"])
    assert mp.check_fits(tp2, 8, 40 * mp.GIB).layout.dp == 4
    assert mp.check_fits(stage2, 8, 80 * mp.GIB).total < 80 * mp.GIB


def test_check_fits_suggests_recompute_when_it_is_off():
    cfg = config.load("stage2_finetune", ["model.activations_checkpoint=false"])
    with pytest.raises(ValueError, match=r"set model.activations_checkpoint=true \(activations 4.6 GiB instead of 33.7\)"):
        mp.check_fits(cfg, 8, 80 * mp.GIB)


def test_preflight_uses_the_configured_capacity(stage2):
    if not torch.cuda.is_available():
        assert mp.preflight(stage2, 8) is None  # no GPU and no trainer.gpu_memory_gib: nothing to check
    cfg = config.load("stage2_finetune", ["+trainer.gpu_memory_gib=40"])
    with pytest.raises(ValueError, match="exceeds the GPU's 40.0 GiB"):
        mp.preflight(cfg, 8)
    assert mp.preflight(cfg, None) is None  # nothing to check against


def test_cli_prints_one_line_per_component_and_the_fit():
    proc = subprocess.run(
        [sys.executable, "bench/memory_plan.py", "--config", "stage2_finetune", "--tp", "1", "--dp", "8", "--gpu-gib", "40"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # does not fit: exit status 1
    lines = [line for line in proc.stdout.splitlines() if line.startswith("memory ")]
    fields = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines]
    parts = {f["component"]: float(f["gib"]) for f in fields if "component" in f}
    assert set(parts) == {"weights", "encoders", "gradients", "optimizer", "activations", "activations_no_recompute",
                          "activations_recompute", "workspace", "total"}
    summed = sum(v for k, v in parts.items() if k in ("weights", "encoders", "gradients", "optimizer", "activations", "workspace"))
    assert parts["total"] == pytest.approx(summed, abs=0.02)
    assert fields[-1]["fits"] == "no" and fields[-1]["tp"] == "1" and fields[-1]["recompute"] == "on"


def test_table_has_both_stages_and_layouts():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import memory_plan as cli
    finally:
        sys.path.remove(str(REPO / "bench"))
    rows = cli.table("vicuna7b").splitlines()
    assert len(rows) == 2 + 4
    body = [r.split("|")[1:-1] for r in rows[2:]]
    assert [(c[0].split()[0], c[1].strip()) for c in body] == [
        ("stage1_pretrain", "1 x 1 x 8"), ("stage1_pretrain", "2 x 1 x 4"),
        ("stage2_finetune", "1 x 1 x 8"), ("stage2_finetune", "2 x 1 x 4")]
    assert body[2][-2].strip() == "no"  # stage 2 at TP1 does not fit 40 GiB either way
    assert "\n".join(rows) in (REPO / "docs" / "training.md").read_text()  # the doc's table is this output


def test_capacity_override_is_checked_before_any_task():
    from nemo_avllm.errors import UserError

    with pytest.raises(UserError, match="trainer.gpu_memory_gib=0 is not valid"):
        config.check_values(config.load("stage2_finetune", ["+trainer.gpu_memory_gib=0"]), paths=False)
    config.check_values(config.load("stage2_finetune", ["+trainer.gpu_memory_gib=79.3"]), paths=False)


def test_meta_builds_stay_off_the_gpu(monkeypatch):
    """On a GPU node megatron would allocate a 'meta' build's weights on the GPU (13 GB for 7B,
    inside the pre-flight check): meta builds must take megatron's CPU-initialisation path."""
    from nemo_avllm.model.provider import megatron_config
    from nemo_avllm.runtime import distributed

    monkeypatch.setattr(distributed, "has_gpu", lambda: True)
    cfg = config.load_model("vicuna7b", ["transformer_impl=local"])
    assert megatron_config(cfg, init_model_with_meta_device=True).use_cpu_initialization is True
    assert megatron_config(cfg).use_cpu_initialization is False  # real GPU builds keep GPU init
