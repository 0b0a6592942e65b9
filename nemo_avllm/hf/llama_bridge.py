"""Hugging Face LLaMA (`LlamaForCausalLM`) <-> the LLM of AVLLM (megatron-core `GPTModel`), both in
the full (TP=1, PP=1) layout. `nemo_avllm.model.parallel_layout` takes the full layout to TP/PP
shards and back; this module only renames and (un)fuses:

- megatron fuses q, k, v into `linear_qkv`, grouped per KV group: `[q heads of group g | k_g | v_g]`
  for g = 0..ng-1 (MHA is the case ng = heads);
- SwiGLU `linear_fc1` is `[gate; up]`;
- megatron pads the vocabulary to `padded_vocab_size` rows (zeros on import, cut on export).

RoPE needs no permutation: HF's LLaMA and megatron (`rotary_interleaved=False`, the default) both
rotate halves of each head (`rotate_half`); HF's own conversion already permuted Meta's
interleaved q/k rows into that layout. The logit-parity tests are the proof.

Everything here works on meta tensors too, which is how the 7B layout is checked without weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nemo_avllm.errors import UserError
from nemo_avllm.model.llm import LLMConfig

PREFIX = "llm."

# megatron per-layer suffix -> (how the HF tensors combine, HF per-layer names)
_LAYER = {
    "input_layernorm.weight": (None, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_proj.weight": (None, ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": (None, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (None, ("mlp.down_proj.weight",)),
}
_GLOBAL = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": (None, ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}


class ConfigMismatchError(UserError):
    """A Hugging Face checkpoint whose config or tensors do not fit the model config."""


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------
def name_map(llm: LLMConfig) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """Full-layout megatron name -> (combination, HF names), for every LLM tensor."""
    out = {f"{PREFIX}{k}": v for k, v in _GLOBAL.items() if k != "output_layer.weight"}
    for i in range(llm.num_layers):
        for suffix, (kind, hf) in _LAYER.items():
            out[f"{PREFIX}decoder.layers.{i}.{suffix}"] = (kind, tuple(f"model.layers.{i}.{n}" for n in hf))
    out[f"{PREFIX}output_layer.weight"] = _GLOBAL["output_layer.weight"]
    return out


def hf_shapes(llm: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `LlamaForCausalLM`'s tensors for this config (what import expects)."""
    h, f, v = llm.hidden_size, llm.ffn_hidden_size, llm.vocab_size
    hn = h // llm.num_attention_heads
    kv = llm.kv_groups * hn
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(llm.num_layers):
        out.update({f"model.layers.{i}.{n}": s for n, s in per_layer.items()})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q/k/v projections -> megatron's grouped `linear_qkv` [ng*(np/ng+2)*hn, h]."""
    h = q.shape[1]
    hn = q.shape[0] // heads
    q = q.reshape(groups, heads // groups * hn, h)
    k = k.reshape(groups, hn, h)
    v = v.reshape(groups, hn, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    per = heads // groups
    h = qkv.shape[1]
    hn = qkv.shape[0] // (groups * (per + 2))
    q, k, v = qkv.reshape(groups, (per + 2) * hn, h).split([per * hn, hn, hn], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _combine(kind: str | None, parts: list[torch.Tensor], llm: LLMConfig) -> torch.Tensor:
    if kind == "qkv":
        return fuse_qkv(*parts, llm.num_attention_heads, llm.kv_groups)
    if kind == "fc1":
        return torch.cat(parts, dim=0)
    if kind == "vocab":
        (t,) = parts
        pad = llm.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
    (t,) = parts
    return t


def _separate(kind: str | None, t: torch.Tensor, llm: LLMConfig) -> tuple[torch.Tensor, ...]:
    if kind == "qkv":
        return split_qkv(t, llm.num_attention_heads, llm.kv_groups)
    if kind == "fc1":
        return tuple(t.chunk(2, dim=0))
    if kind == "vocab":
        return (t[: llm.vocab_size],)
    return (t,)


class LazyTensors(Mapping):
    """A read-only state dict whose tensors are made when asked for (one at a time)."""

    def __init__(self, names, make: Callable[[str], torch.Tensor]):
        self._names = list(names)
        self._set = set(self._names)
        self._make = make

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._set


def to_megatron(llm: LLMConfig, hf_get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None) -> LazyTensors:
    """Full-layout megatron LLM tensors (`llm.*`) computed from HF tensors on demand."""
    names = name_map(llm)

    def make(name: str) -> torch.Tensor:
        kind, hf = names[name]
        t = _combine(kind, [hf_get(n) for n in hf], llm)
        return t.to(dtype) if dtype is not None else t

    return LazyTensors(names, make)


def to_hf(llm: LLMConfig, megatron_get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None) -> LazyTensors:
    """`LlamaForCausalLM` tensors computed from full-layout megatron tensors on demand."""
    owner: dict[str, tuple[str, int]] = {}
    for name, (_, hf) in name_map(llm).items():
        for i, n in enumerate(hf):
            owner[n] = (name, i)
    names = name_map(llm)

    def make(hf_name: str) -> torch.Tensor:
        name, i = owner[hf_name]
        t = _separate(names[name][0], megatron_get(name), llm)[i]
        return t.to(dtype) if dtype is not None else t

    return LazyTensors(hf_shapes(llm), make)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
def read_hf_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a Hugging Face LLaMA/Vicuna model folder")
    return json.loads(path.read_text())


def _rope(hf: dict) -> tuple[str, float]:
    """(rope type, theta) from a config.json of any transformers version."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kinds = {params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ("+".join(sorted(kinds)) or "default"), float(theta)


def hf_values(hf: dict) -> dict:
    """The architecture numbers of a LLaMA config.json, named as in `LLMConfig`."""
    heads = hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "kv_groups": hf.get("num_key_value_heads") or heads,
        "rotary_base": _rope(hf)[1],
        "layernorm_epsilon": hf.get("rms_norm_eps", 1e-6),
    }


# LLMConfig field -> config.json key, for messages
_HF_KEY = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "kv_groups": "num_key_value_heads",
    "rotary_base": "rope_theta",
    "layernorm_epsilon": "rms_norm_eps",
}


def check_hf_config(hf: dict, llm: LLMConfig, where: str) -> None:
    """Refuse a config.json that is not this LLaMA architecture; name both values."""
    arch = hf.get("model_type")
    if arch != "llama":
        raise ConfigMismatchError(f"{where}/config.json has model_type={arch!r}; import-hf reads LLaMA/Vicuna ('llama') checkpoints")
    fixed = {
        "hidden_act": ("silu", hf.get("hidden_act", "silu")),
        "tie_word_embeddings": (False, hf.get("tie_word_embeddings", False)),
        "attention_bias": (False, hf.get("attention_bias", False)),
        "mlp_bias": (False, hf.get("mlp_bias", False)),
        "rope type": ("default", _rope(hf)[0]),
    }
    for key, (want, got) in fixed.items():
        if got != want:
            raise ConfigMismatchError(f"{where}/config.json has {key}={got!r}; the AVLLM LLM (LLaMA) needs {key}={want!r}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        raise ConfigMismatchError(
            f"{where}/config.json has head_dim={head_dim}, not hidden_size/num_attention_heads="
            f"{hf['hidden_size'] // hf['num_attention_heads']}; megatron's kv_channels would differ"
        )
    values = hf_values(hf)
    for field, got in values.items():
        want = llm.kv_groups if field == "kv_groups" else getattr(llm, field)
        same = abs(got - want) <= 1e-12 * max(1.0, abs(want)) if isinstance(want, float) else got == want
        if not same:
            ours = "num_query_groups" if field == "kv_groups" else field
            raise ConfigMismatchError(
                f"{where}/config.json {_HF_KEY[field]}={got} does not match model.llm.{ours}={want} ({llm.name}); "
                f"choose the model config of this checkpoint (e.g. model=vicuna7b) or fix one of them"
            )


def check_hf_weights(shape_of: Callable[[str], tuple[int, ...]], names, llm: LLMConfig, where: str) -> None:
    """Every `LlamaForCausalLM` tensor is present with the shape its config implies."""
    have = set(names)
    want = hf_shapes(llm)
    missing = [n for n in want if n not in have]
    if missing:
        raise ConfigMismatchError(f"{where} lacks {len(missing)} LLaMA tensors, e.g. {missing[:4]}; is the checkpoint complete?")
    hn = llm.hidden_size // llm.num_attention_heads
    why = {
        "model.embed_tokens.weight": f"vocab_size={llm.vocab_size}, hidden_size={llm.hidden_size}",
        "lm_head.weight": f"vocab_size={llm.vocab_size}, hidden_size={llm.hidden_size}",
        "self_attn.k_proj.weight": f"num_key_value_heads={llm.kv_groups} x head_dim={hn}, hidden_size={llm.hidden_size}",
        "self_attn.v_proj.weight": f"num_key_value_heads={llm.kv_groups} x head_dim={hn}, hidden_size={llm.hidden_size}",
        "mlp.gate_proj.weight": f"intermediate_size={llm.ffn_hidden_size}, hidden_size={llm.hidden_size}",
        "mlp.up_proj.weight": f"intermediate_size={llm.ffn_hidden_size}, hidden_size={llm.hidden_size}",
        "mlp.down_proj.weight": f"hidden_size={llm.hidden_size}, intermediate_size={llm.ffn_hidden_size}",
    }
    for name, shape in want.items():
        got = tuple(shape_of(name))
        if got != shape:
            reason = next((r for k, r in why.items() if name.endswith(k)), f"hidden_size={llm.hidden_size}")
            raise ConfigMismatchError(
                f"{where}: tensor {name} has shape {got}, but config.json ({reason}) implies {shape}; "
                f"the config does not describe these weights"
            )


def hf_llama_config(llm: LLMConfig, dtype: torch.dtype, bos_token_id: int | None = 1, eos_token_id: int | None = 2):
    """The `LlamaConfig` of this LLM (what the export writes as llm/config.json)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.kv_groups,
        hidden_act="silu",
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.layernorm_epsilon,
        rope_theta=float(llm.rotary_base),
        initializer_range=llm.init_method_std,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )
