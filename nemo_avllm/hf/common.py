"""What import and export share: one-process megatron state, weight-less model shells, and
output folders that appear only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(name: str | None, default: str) -> str:
    """A checked dtype name (`fp32`, `bf16`, `fp16`); `default` when `name` is null."""
    name = name or default
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r}; expected one of {sorted(DTYPE_NAMES)}")
    return name


@contextlib.contextmanager
def single_process():
    """megatron parallel state at TP=1, PP=1 for a one-process tool. Reuses a state that is already
    TP=1/PP=1 (tests, notebooks) and tears down only what it set up."""
    from megatron.core import parallel_state as ps

    from nemo_avllm.runtime import distributed

    if ps.model_parallel_is_initialized():
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise RuntimeError(f"import/export run in one process; this one is set up for TP={tp}, PP={pp}")
        yield
        return
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise RuntimeError("import/export run in one process; launch them with python, not torchrun")
    distributed.initialize(1, 1)
    try:
        yield
    finally:
        distributed.destroy()


def whole_swiglu(sharded: dict) -> dict:
    """A TP=1 sharded state dict with megatron's SwiGLU factories replaced by one plain sharded
    tensor per `linear_fc1` (the same global tensor, [gate; up]).

    The factory chunks fc1 into gate and up on save and concatenates them into new tensors on
    load: an extra copy of every layer's fc1 (about 45% of a LLaMA) held at once. A whole-tensor
    shard reads and writes in place; dist checkpointing still reshards it to any TP/PP."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    out = {}
    for name, v in sharded.items():
        if isinstance(v, ShardedTensorFactory) and name.endswith("mlp.linear_fc1.weight"):
            gate, up = v.build()
            p = gate.prepend_axis_num
            if gate.key != v.key or up.key != v.key or tuple(gate.global_shape[p:]) != tuple(v.data.shape):
                raise RuntimeError(f"{name}: not a TP=1 SwiGLU factory over one global tensor")
            offsets = [(ax, gate.global_offset[ax], gate.axis_fragmentations[ax]) for ax in range(p)]
            v = ShardedTensor.from_rank_offsets(v.key, v.data, *offsets, replica_id=gate.replica_id, prepend_axis_num=p)
        out[name] = v
    return out


def llm_only_module(model_cfg):
    """A megatron module holding just the LLM under AVLLM's `llm.` prefix, so its checkpoint keys are
    the ones AVLLM loads (`model.restore_from`: projectors and encoders are not in it)."""
    from megatron.core.transformer.module import MegatronModule

    from nemo_avllm.model.llm import build_gpt
    from nemo_avllm.model.provider import avllm_config, megatron_config

    class LLMOnly(MegatronModule):
        def __init__(self):
            config = megatron_config(model_cfg, init_model_with_meta_device=True)
            super().__init__(config=config)
            self.cfg = avllm_config(model_cfg)
            self.llm = build_gpt(self.cfg.llm, config, "local")

        def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
            return whole_swiglu(super().sharded_state_dict(prefix, sharded_offsets, metadata))

    return LLMOnly()


def _tensors(module) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in whole_swiglu(module.sharded_state_dict(prefix="")).items() if not isinstance(v, ShardedObject)}


def missing_tensors(path: str | Path, module) -> list[str]:
    """Checkpoint keys of `module`'s tensors that the dist checkpoint at `path` lacks."""
    from nemo_avllm.training.checkpoint import tensor_keys

    return sorted({v.key for v in _tensors(module).values()} - tensor_keys(path))


def load_tensors(path: str | Path, module) -> None:
    """Load the tensors of a dist checkpoint that `module` (TP=1/PP=1) has, in place, resharding
    from whatever TP/PP saved them (what it lacks stays as it is: see `missing_tensors`)."""
    from nemo_avllm.training.checkpoint import read_tensors, tensor_keys

    saved = tensor_keys(path)
    wanted = {k: v for k, v in _tensors(module).items() if v.key in saved}
    if wanted:
        loaded = read_tensors(path, {"model": wanted})["model"]
        module.load_state_dict(loaded, strict=False)


def empty_model(model_cfg, llm_only: bool):
    """The TP=1/PP=1 model (or its LLM alone) with uninitialised CPU weights: no random init, no
    encoders (their weights come separately). Import and export fill every tensor they use."""
    from omegaconf import OmegaConf

    from nemo_avllm.model.provider import build_model

    # the bridges name tensors by the local spec's modules; checkpoint keys are the same for both
    # layer specs, so import/export need no Transformer Engine
    model_cfg = OmegaConf.merge(model_cfg, {"transformer_impl": "local"})
    with torch.device("meta"):
        model = llm_only_module(model_cfg) if llm_only else build_model(model_cfg, pre_process=True, post_process=True, meta=True)
    dtype = DTYPE_NAMES[model_cfg.get("params_dtype", "fp32")]
    return model.to_empty(device="cpu").to(dtype)


@contextlib.contextmanager
def staged_folder(out: str | Path, overwrite: bool):
    """Yield a sibling temporary folder; on success it replaces `out`. A non-empty `out` is kept
    (and the call refused) unless `overwrite`; a failure leaves `out` as it was."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite=true")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
