"""The Vicuna-7B layout, without its weights: the megatron model built on the meta device goes
through the same name mapping and q/k/v, gate/up splits as a real export, and the result has
exactly the names and shapes of `LlamaForCausalLM` for Vicuna-7B v1.5 (also built on meta)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nemo_avllm.hf import llama_bridge

VICUNA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_vicuna7b_exports_to_llama_names_and_shapes(dist1):
    from nemo_avllm import config
    from nemo_avllm.config import to_dict
    from nemo_avllm.model.llm import LLMConfig
    from nemo_avllm.model.parallel_layout import local_tensors
    from nemo_avllm.model.provider import build_model

    cfg = config.load_model("vicuna7b")
    llm = LLMConfig.from_dict(to_dict(cfg.llm))
    megatron = {n: t for n, t in local_tensors(build_model(cfg, meta=True)).items() if n.startswith("llm.")}
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in megatron.values())
    assert set(megatron) == set(llama_bridge.name_map(llm))  # every LLM tensor is mapped, nothing else

    hf = llama_bridge.to_hf(llm, megatron.__getitem__)
    exported = {n: tuple(hf[n].shape) for n in hf}
    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**VICUNA_7B))
    assert exported == {n: tuple(p.shape) for n, p in reference.state_dict().items()}
    assert exported == llama_bridge.hf_shapes(llm)  # what import checks HF folders against

    # and back: HF tensors (meta) -> megatron's fused layout, shape for shape
    back = llama_bridge.to_megatron(llm, dict(reference.state_dict()).__getitem__)
    assert {n: tuple(back[n].shape) for n in back} == {n: tuple(t.shape) for n, t in megatron.items()}

    params = sum(t.numel() for t in megatron.values())
    largest = max(megatron.items(), key=lambda kv: kv[1].numel())
    print(f"vicuna7b: {params / 1e9:.2f} B LLM parameters, {params * 2 / 2**30:.1f} GiB in bf16; "
          f"largest tensor {largest[0]} {tuple(largest[1].shape)} = {largest[1].numel() * 2 / 2**20:.0f} MiB")
    assert params == llm.num_parameters()
