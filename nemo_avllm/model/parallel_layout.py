"""How one full (TP=1, PP=1) state dict maps onto the shards of a TP x PP rank, and back.

Megatron marks each tensor-parallel parameter with `partition_dim`; everything else is
replicated. Two layouts need more than a plain chunk: the SwiGLU `linear_fc1` weight is
[gate; up] and a rank holds `cat(gate.chunk(tp)[r], up.chunk(tp)[r])`; the fused QKV weight is
grouped per KV group, so a plain chunk over groups is already right. Pipeline stages number
their layers from 0; the full layout numbers them globally. Checkpoint import/export and the
parity tests all go through these functions."""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"(^|\.)decoder\.layers\.(\d+)\.")


def layer_offset(num_layers: int, pp_rank: int, pp: int, first_stage_layers: int | None = None) -> int:
    """Global index of a stage's first LLM layer (uniform split, or `first_stage_layers` on stage 0)."""
    from nemo_avllm.model.llm import stage_layers

    return sum(stage_layers(num_layers, pp, first_stage_layers)[:pp_rank])


def to_global_name(local_name: str, offset: int) -> str:
    """`llm.decoder.layers.0.x` on a stage with offset 16 -> `llm.decoder.layers.16.x`."""
    return _LAYER.sub(lambda m: f"{m.group(1)}decoder.layers.{int(m.group(2)) + offset}.", local_name, count=1)


def _is_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def tp_shard(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a full tensor, following the parameter's megatron TP attributes."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def tp_unshard(name: str, shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of `tp_shard`: the full tensor from every TP rank's slice (in rank order)."""
    if len(shards) == 1 or not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim = param.partition_dim
    if _is_fc1(name):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([torch.cat(gates, dim=0), torch.cat(ups, dim=0)], dim=0)
    return torch.cat(shards, dim=dim)


def local_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of this rank, by global (full-layout) name."""
    from megatron.core import parallel_state as ps

    offset = layer_offset(model.cfg.llm.num_layers, ps.get_pipeline_model_parallel_rank(),
                          ps.get_pipeline_model_parallel_world_size(), model.config.num_layers_in_first_pipeline_stage)
    named = dict(model.named_parameters())
    named.update((n, b) for n, b in model.state_dict(keep_vars=True).items() if isinstance(b, torch.Tensor) and n not in named)
    return {to_global_name(n, offset): t for n, t in named.items()}


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy a full-layout state dict into this rank's shard of the model. Returns missing keys."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    missing = []
    for name, param in local_tensors(model).items():
        if name not in full:
            missing.append(name)
            continue
        shard = tp_shard(name, full[name], param, tp_rank, tp)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: checkpoint slice has shape {tuple(shard.shape)}, model has {tuple(param.shape)}")
        param.copy_(shard)
    if strict and missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:5]}")
    return missing
