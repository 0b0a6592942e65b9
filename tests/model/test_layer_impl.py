"""`transformer_impl: auto`, megatron fusions per device, checkpoint keys shared by the local and
Transformer Engine layer specs, and the parallel settings this model refuses (issue 9)."""

from __future__ import annotations

import logging

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.model import llm
from nemo_avllm.model.provider import build_model, megatron_config
from nemo_avllm.training import optim

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice; a GPU is present")


@no_gpu
def test_auto_is_local_without_cuda_or_te_and_is_logged_once(caplog):
    llm._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="nemo_avllm.model.llm"):
        assert llm.resolve_transformer_impl("auto") == "local"
        assert llm.resolve_transformer_impl("auto") == "local"
    msgs = [r.getMessage() for r in caplog.records if "transformer_impl=auto" in r.getMessage()]
    assert msgs == ["model.transformer_impl=auto -> local (no CUDA device)"]
    if not llm.te_available():  # a GPU without TE also falls back, saying why
        with caplog.at_level(logging.INFO, logger="nemo_avllm.model.llm"):
            assert llm.resolve_transformer_impl("auto", gpu=True) == "local"
        assert "model.transformer_impl=auto -> local (Transformer Engine not installed)" in caplog.messages
    assert llm.resolve_transformer_impl("local") == "local"
    with pytest.raises(ValueError, match="transformer_impl='te'.*expected one of"):
        llm.resolve_transformer_impl("te")


def test_model_configs_default_to_auto():
    for name in ("tiny", "vicuna7b", "vicuna13b"):
        assert config.load_model(name).transformer_impl == "auto"


@no_gpu
def test_fusions_off_on_cpu_on_with_gpu():
    cpu = llm.fusion_flags("local", gpu=False)
    assert set(cpu) == set(llm.FUSIONS) and not any(cpu.values())
    gpu = llm.fusion_flags("local", gpu=True)
    assert gpu["bias_activation_fusion"] and gpu["bias_dropout_fusion"]  # megatron's jit fusions: any GPU
    # kernel-backed fusions only where their kernels import (Apex / TE; neither is on this machine)
    assert gpu["gradient_accumulation_fusion"] == llm._has_module("fused_weight_gradient_mlp_cuda")
    assert gpu["masked_softmax_fusion"] == llm._has_module("scaled_upper_triang_masked_softmax_cuda")
    assert gpu["apply_rope_fusion"] is False  # local spec: TE's fused RoPE not used
    tc = megatron_config(config.load_model("tiny"))
    assert not any(getattr(tc, k) for k in llm.FUSIONS)


def te_spec_keys(num_layers: int, monkeypatch) -> tuple[set[str], set[str]]:
    """Sharded-checkpoint keys (tensors, objects) of the LLM built with megatron's Transformer
    Engine spec, derived where TE is absent: megatron's real TE spec function gives the module
    tree (which slots hold TE's fused LayerNorm-linear, which are IdentityOp), and TE's modules
    contribute their parameters (`LayerNormLinear`: weight + layer_norm_weight; `Linear`:
    weight; every TE module: `_extra_state`)."""
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.identity_op import IdentityOp

    monkeypatch.setattr(specs, "TESpecProvider", TESpecProvider)  # None in megatron without TE
    sub = specs.get_gpt_layer_with_transformer_engine_submodules()
    params = {
        te.TELayerNormColumnParallelLinear: ("weight", "layer_norm_weight"),
        te.TEColumnParallelLinear: ("weight",),
        te.TERowParallelLinear: ("weight",),
        te.TEDotProductAttention: (),
        IdentityOp: (),
    }
    attn, mlp = sub.self_attention.submodules, sub.mlp.keywords["submodules"]
    slots = {
        "input_layernorm": sub.input_layernorm,
        "pre_mlp_layernorm": sub.pre_mlp_layernorm,
        "self_attention.linear_qkv": attn.linear_qkv,
        "self_attention.core_attention": attn.core_attention,
        "self_attention.linear_proj": attn.linear_proj,
        "self_attention.q_layernorm": attn.q_layernorm,
        "self_attention.k_layernorm": attn.k_layernorm,
        "mlp.linear_fc1": mlp.linear_fc1,
        "mlp.linear_fc2": mlp.linear_fc2,
    }
    tensors = {"llm.embedding.word_embeddings.weight", "llm.decoder.final_layernorm.weight", "llm.output_layer.weight"}
    objects = set()  # the output layer is megatron's own linear in both specs
    for slot, module in slots.items():
        tensors |= {f"llm.decoder.layers.{slot}.{p}" for p in params[module]}  # layers stacked in one key
        if module is not IdentityOp:
            objects.add(f"llm.decoder.layers.{slot}._extra_state")
    assert num_layers > 0
    return tensors, objects


def test_local_checkpoint_keys_are_the_transformer_engine_keys(dist1, monkeypatch):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model = build_model(config.load_model("tiny", ["build_encoders=false"]))
    assert model.cfg.transformer_impl == "local"
    sharded = {k: v for k, v in model.sharded_state_dict(prefix="").items() if k.startswith("llm.")}
    local_tensors = {v.key for v in sharded.values() if not isinstance(v, ShardedObject)}
    local_objects = {v.key for v in sharded.values() if isinstance(v, ShardedObject)}
    te_tensors, te_objects = te_spec_keys(model.cfg.llm.num_layers, monkeypatch)
    assert local_tensors == te_tensors  # every weight loads across the two specs
    # TE's attention adds FP8 metadata the local spec lacks; loading skips such entries
    assert local_objects <= te_objects
    assert all(llm.impl_only_key(k) for k in te_objects - local_objects)
    assert te_objects - local_objects == {"llm.decoder.layers.self_attention.core_attention._extra_state"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["tensor_model_parallel_size=2", "sequence_parallel=true"], "sequence_parallel=true needs Transformer Engine"),
        (["tensor_model_parallel_size=2", "+seq_length=63", "sequence_parallel=true"], "seq_length=63 must be divisible"),
        (["+context_parallel_size=2"], "context parallelism is not supported"),
        (["fp8=hybrid"], "fp8=hybrid needs Transformer Engine"),
        (["transformer_impl=local", "fp8=e5m2"], "model.fp8='e5m2'"),
        (["pipeline_model_parallel_size=2", "num_layers_in_first_pipeline_stage=4"], "must be in 1..3"),
        (["num_layers_in_first_pipeline_stage=1"], "needs pipeline_model_parallel_size >= 2"),
    ],
)
def test_unsupported_parallel_and_precision_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        megatron_config(config.load_model("tiny", overrides))


def test_uneven_pipeline_layout():
    assert llm.stage_layers(32, 4) == [8, 8, 8, 8]
    assert llm.stage_layers(32, 4, first=5) == [5, 9, 9, 9]
    with pytest.raises(ValueError, match="split evenly"):
        megatron_config(config.load_model("vicuna7b", ["pipeline_model_parallel_size=4", "num_layers_in_first_pipeline_stage=6"]))
    tc = megatron_config(config.load_model("vicuna7b", ["pipeline_model_parallel_size=4", "num_layers_in_first_pipeline_stage=5"]))
    assert tc.num_layers_in_first_pipeline_stage == 5


def test_ddp_overlaps_are_on_with_gpus_and_configurable():
    cfg = config.load("stage1_pretrain").model
    assert optim.overlap_settings(cfg, use_distributed_optimizer=True, gpu=True) == {
        "overlap_grad_reduce": True, "overlap_param_gather": True}
    assert optim.overlap_settings(cfg, use_distributed_optimizer=False, gpu=True) == {
        "overlap_grad_reduce": True, "overlap_param_gather": False}
    assert optim.overlap_settings(cfg, use_distributed_optimizer=False, gpu=False) == {
        "overlap_grad_reduce": False, "overlap_param_gather": False}
    off = config.load("stage1_pretrain", ["model.overlap_grad_reduce=false"]).model
    assert optim.overlap_settings(off, True, True)["overlap_grad_reduce"] is False
    with pytest.raises(ValueError, match="overlap_param_gather=true needs the distributed optimizer"):
        optim.overlap_settings(config.load("stage1_pretrain", ["model.overlap_param_gather=true"]).model, False, True)


def test_collective_timeout_is_a_config_key():
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training.train import build_trainer

    cfg = config.load("stage1_pretrain", ["model=tiny", "trainer.devices=1", "trainer.dist_timeout_minutes=7"])
    trainer = build_trainer(cfg, steps=1)
    assert trainer.strategy.timeout_minutes == 7
    with pytest.raises(ValueError, match="dist_timeout_minutes=0"):
        distributed.check_timeout(0)


def test_checkpoint_without_the_other_specs_extra_state_loads_strictly(dist1, tmp_path):
    """A checkpoint of one layer spec lacks `_extra_state` entries the other has (TE's attention):
    a strict load still takes every weight."""
    from megatron.core import dist_checkpointing

    from nemo_avllm.training import checkpoint

    cfg = config.load_model("tiny", ["build_encoders=false"])
    torch.manual_seed(1)
    src = build_model(cfg)
    sharded = {k: v for k, v in src.sharded_state_dict(prefix="").items() if not llm.impl_only_key(k)}
    (tmp_path / "ckpt").mkdir()
    checkpoint._sync_writer_queue()
    dist_checkpointing.save({"model": sharded, checkpoint.COMMON_KEY: {}}, str(tmp_path / "ckpt"))
    torch.manual_seed(2)
    dst = build_model(cfg)
    checkpoint.load(tmp_path / "ckpt", dst)  # strict: no allow_missing
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


@no_gpu
def test_gradient_accumulation_fusion_whenever_te_or_apex_provides_it(dist1):
    """TE layers fuse it themselves; megatron's own linears (projectors, output layer, the local
    spec) need Apex's kernel and are built unfused without it, instead of refusing the flag."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from nemo_avllm.model.avllm import AVLLM
    from nemo_avllm.model.provider import avllm_config

    apex = llm._has_module("fused_weight_gradient_mlp_cuda")
    assert llm.fusion_flags("transformer_engine", gpu=True)["gradient_accumulation_fusion"] is True
    assert llm.fusion_flags("local", gpu=True)["gradient_accumulation_fusion"] is apex
    cfg = config.load_model("tiny")
    cfg.build_encoders = False
    tc = megatron_config(cfg)
    tc.gradient_accumulation_fusion = True  # as on a GPU node with pip-installed TE
    model = AVLLM(avllm_config(cfg), tc)  # megatron refuses the flag here without the fix
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert linears and all(m.gradient_accumulation_fusion is apex for m in linears)
    assert model.proj_audio.linear in linears and model.llm.output_layer in linears
