"""The LLM: a LLaMA-architecture decoder (Vicuna) built with megatron-core's `GPTModel`.

Architecture numbers come from `conf/model/llm/*.yaml` (vicuna7b, vicuna13b, tiny); this file
only turns such a config into a megatron `TransformerConfig` and a `GPTModel` for one pipeline
stage. LLaMA = RMSNorm, SwiGLU, RoPE, untied input/output embeddings, no biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

TRANSFORMER_IMPLS = ("local", "transformer_engine")


@dataclass
class LLMConfig:
    """LLaMA hyper-parameters (names follow megatron-core)."""

    name: str = "llama"
    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_query_groups: int | None = None  # None = MHA
    ffn_hidden_size: int = 11008
    vocab_size: int = 32000
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0  # LLaMA/Vicuna train without dropout; tests use 0.1 for RNG exactness
    attention_dropout: float = 0.0

    @classmethod
    def from_dict(cls, d) -> "LLMConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model.llm: unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: d[k] for k in d})

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to `make_vocab_size_divisible_by` (independent of TP, so checkpoints
        reshard between TP sizes without changing the embedding shape)."""
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    def num_parameters(self) -> int:
        """Parameter count by shape arithmetic (embedding + layers + final norm + output)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        kv = self.kv_groups * (h // self.num_attention_heads)
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * f  # gate, up, down
        layer = attn + mlp + 2 * h  # two RMSNorm weights
        return v * h + self.num_layers * layer + h + v * h

    def validate(self, tp: int, pp: int) -> None:
        """Errors a user can fix before any weights are allocated."""
        where = f"model.llm ({self.name})"
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{where}: hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.kv_groups:
            raise ValueError(f"{where}: num_attention_heads {self.num_attention_heads} not divisible by num_query_groups {self.kv_groups}")
        if self.num_attention_heads % tp or self.kv_groups % tp:
            raise ValueError(
                f"{where}: tensor_model_parallel_size={tp} must divide num_attention_heads "
                f"({self.num_attention_heads}) and num_query_groups ({self.kv_groups}); choose a TP among "
                f"{[d for d in range(1, self.kv_groups + 1) if self.kv_groups % d == 0 and self.num_attention_heads % d == 0]}"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(f"{where}: tensor_model_parallel_size={tp} must divide ffn_hidden_size {self.ffn_hidden_size}")
        if self.padded_vocab_size % tp:
            raise ValueError(f"{where}: tensor_model_parallel_size={tp} must divide the padded vocab {self.padded_vocab_size}")
        if self.num_layers % pp:
            raise ValueError(f"{where}: pipeline_model_parallel_size={pp} must divide num_layers {self.num_layers}")


def transformer_config(
    llm: LLMConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    sequence_parallel: bool = False,
    use_cpu_initialization: bool | None = None,
    init_model_with_meta_device: bool = False,
):
    """megatron `TransformerConfig` for a LLaMA model. Fusions that need CUDA extensions stay off
    on CPU; on GPU they are the defaults of the TE layer spec."""
    from megatron.core.transformer import TransformerConfig

    llm.validate(tensor_model_parallel_size, pipeline_model_parallel_size)
    gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.kv_groups,
        ffn_hidden_size=llm.ffn_hidden_size,
        kv_channels=llm.hidden_size // llm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=llm.layernorm_epsilon,
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=llm.hidden_dropout,
        attention_dropout=llm.attention_dropout,
        init_method_std=llm.init_method_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        autocast_dtype=params_dtype,
        use_cpu_initialization=(not gpu) if use_cpu_initialization is None else use_cpu_initialization,
        init_model_with_meta_device=init_model_with_meta_device,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def layer_spec(impl: str):
    """megatron-core local layers (anywhere) or Transformer Engine layers (GPU nodes)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if impl == "local":
        return specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the GPU extra
            raise ImportError(
                "model.transformer_impl=transformer_engine needs Transformer Engine: "
                "pip install 'nemo_avllm[gpu]' on a CUDA node, or set model.transformer_impl=local"
            ) from e
        return specs.get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.transformer_impl={impl!r}; expected one of {TRANSFORMER_IMPLS}")


def build_gpt(llm: LLMConfig, config, impl: str = "local", pre_process: bool = True, post_process: bool = True):
    """One pipeline stage of the LLM as a megatron-core `GPTModel`."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(impl),
        vocab_size=llm.padded_vocab_size,
        max_sequence_length=llm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(llm.rotary_base),
        # the multimodal splice happens on the full sequence; AVLLM scatters it itself
        scatter_embedding_sequence_parallel=False,
    )
