"""The LLM: a LLaMA-architecture decoder (Vicuna) built with megatron-core's `GPTModel`.

Architecture numbers come from `conf/model/llm/*.yaml` (vicuna7b, vicuna13b, tiny); this file
only turns such a config into a megatron `TransformerConfig` and a `GPTModel` for one pipeline
stage. LLaMA = RMSNorm, SwiGLU, RoPE, untied input/output embeddings, no biases.
"""

from __future__ import annotations


import importlib.util
import logging
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
FP8_FORMATS = ("hybrid", "e4m3")  # megatron's `fp8` values (TE, Hopper or newer)
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# megatron fusion flags this project sets; all off on CPU (see `fusion_flags`)
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion")
_LOGGED: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def te_available() -> bool:
    """Transformer Engine importable (megatron's own probe, so both agree)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_transformer_impl(impl: str, gpu: bool | None = None) -> str:
    """`auto` -> `transformer_engine` when a CUDA device is in use and TE imports, else `local`
    (logged once per process). Explicit values are checked, not changed."""
    from nemo_avllm.runtime.distributed import has_gpu

    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"model.transformer_impl={impl!r}; expected one of {TRANSFORMER_IMPLS}")
    if impl != "auto":
        return impl
    gpu = has_gpu() if gpu is None else gpu
    if gpu and te_available():
        chosen, why = "transformer_engine", "CUDA device and Transformer Engine present"
    else:
        chosen, why = "local", "no CUDA device" if not gpu else "Transformer Engine not installed"
    _log_once(f"model.transformer_impl=auto -> {chosen} ({why})")
    return chosen


def fusion_flags(impl: str, gpu: bool) -> dict[str, bool]:
    """megatron's fused kernels for this device: all on with a GPU where their kernels exist, all
    off on CPU (they are CUDA kernels or jit-fused for CUDA).

    - bias-SwiGLU and bias-dropout-add: megatron's own jit-fused functions, any GPU;
    - masked softmax: the local spec's attention, with the `scaled_upper_triang_masked_softmax_cuda`
      kernel (Apex / NGC; TE's attention does not use the flag);
    - RoPE: TE's fused rotary kernel;
    - gradient-accumulation fusion (weight gradients accumulated into DDP's fp32 buffer inside the
      GEMM): Transformer Engine's layers do it themselves; megatron's own linears (the local
      spec, and the projectors and output layer even with the TE spec) need Apex's
      `fused_weight_gradient_mlp_cuda`, and without it are built unfused (`build_gpt`,
      `apex_grad_accumulation`)."""
    if not gpu:
        return dict.fromkeys(FUSIONS, False)
    rope = False
    if impl == "transformer_engine":
        from megatron.core.models.common.embeddings import rope_utils

        rope = rope_utils.fused_apply_rotary_pos_emb is not None
    return {
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
        "masked_softmax_fusion": _has_module("scaled_upper_triang_masked_softmax_cuda"),
        "apply_rope_fusion": rope,
        "gradient_accumulation_fusion": impl == "transformer_engine" or apex_grad_accumulation(),
    }


def apex_grad_accumulation() -> bool:
    """megatron's own linears can fuse gradient accumulation (Apex's kernel is there)."""
    return _has_module("fused_weight_gradient_mlp_cuda")


def build_with_megatron_linears(config, build):
    """`build()` (a module holding megatron linears) under a config whose
    `gradient_accumulation_fusion` is on for Transformer Engine's layers while Apex's kernel is
    missing (pip-installed TE): megatron's linear refuses the flag at construction without that
    kernel, so the check is let through while building and every megatron linear of the result
    then takes the unfused path."""
    from megatron.core.tensor_parallel import layers

    if not config.gradient_accumulation_fusion or apex_grad_accumulation():
        return build()
    saved = layers._grad_accum_fusion_available
    layers._grad_accum_fusion_available = True
    try:
        module = build()
    finally:
        layers._grad_accum_fusion_available = saved
    for m in module.modules():
        if isinstance(m, (layers.ColumnParallelLinear, layers.RowParallelLinear)):
            m.gradient_accumulation_fusion = False
    return module


def stage_layers(num_layers: int, pp: int, first: int | None = None) -> list[int]:
    """LLM layers per pipeline stage: uniform, or `first` on stage 0 (which also runs the
    encoders and projectors) and the rest split evenly over the other stages."""
    if first is None:
        return [num_layers // pp] * pp
    return [first] + [(num_layers - first) // (pp - 1)] * (pp - 1)


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

    def validate(self, tp: int, pp: int, first_stage_layers: int | None = None) -> None:
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
        if first_stage_layers is None:
            if self.num_layers % pp:
                raise ValueError(
                    f"{where}: pipeline_model_parallel_size={pp} must divide num_layers {self.num_layers} "
                    f"(or set model.num_layers_in_first_pipeline_stage)"
                )
            return
        first, rest = int(first_stage_layers), self.num_layers - int(first_stage_layers)
        if pp < 2:
            raise ValueError(f"model.num_layers_in_first_pipeline_stage={first} needs pipeline_model_parallel_size >= 2")
        if not 0 < first < self.num_layers or rest % (pp - 1):
            raise ValueError(
                f"model.num_layers_in_first_pipeline_stage={first}: must be in 1..{self.num_layers - 1} and leave a "
                f"number of layers ({rest}) that the other {pp - 1} stages split evenly"
            )


def transformer_config(
    llm: LLMConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    sequence_parallel: bool = False,
    use_cpu_initialization: bool | None = None,
    init_model_with_meta_device: bool = False,
    impl: str = "local",
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    num_layers_in_first_pipeline_stage: int | None = None,
    gpu: bool | None = None,
):
    """megatron `TransformerConfig` for a LLaMA model on the layer spec `impl` (already resolved:
    `local` or `transformer_engine`). Fusions follow `fusion_flags` (on with GPUs, off on CPU)."""
    from megatron.core.transformer import TransformerConfig

    from nemo_avllm.runtime.distributed import has_gpu

    tp = tensor_model_parallel_size
    llm.validate(tp, pipeline_model_parallel_size, num_layers_in_first_pipeline_stage)
    gpu = has_gpu() if gpu is None else gpu
    if impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_config: impl={impl!r} must be resolved first (resolve_transformer_impl)")
    sequence_parallel = bool(sequence_parallel) and tp > 1
    if sequence_parallel and impl != "transformer_engine":
        raise ValueError(
            "model.sequence_parallel=true needs Transformer Engine layers (model.transformer_impl=transformer_engine "
            "or auto on a CUDA node with TE): the local spec's RMSNorm (torch) cannot run on sequence shards. "
            "Set model.sequence_parallel=false here."
        )
    if fp8 is not None:
        _check_fp8(fp8, fp8_recipe, impl, gpu)
    flags = fusion_flags(impl, gpu)
    _log_once(f"megatron fusions ({'GPU' if gpu else 'CPU'}, {impl}): " + ", ".join(f"{k}={v}" for k, v in flags.items()))
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
        **flags,
        persist_layer_norm=False,  # Apex LayerNorm only; LLaMA uses RMSNorm
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
        sequence_parallel=sequence_parallel,
        fp8=fp8,
        fp8_recipe=fp8_recipe if fp8 is not None else "delayed",
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


def _check_fp8(fp8: str, recipe: str, impl: str, gpu: bool) -> None:
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"model.fp8={fp8!r}; expected null or one of {FP8_FORMATS}")
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe={recipe!r}; expected one of {FP8_RECIPES}")
    if impl != "transformer_engine":
        raise ValueError(f"model.fp8={fp8} needs Transformer Engine layers; the layer spec here is {impl}: set model.fp8=null")
    if not gpu or torch.cuda.get_device_capability() < (8, 9):
        raise ValueError(f"model.fp8={fp8} needs an FP8 GPU (Hopper/Ada or newer, compute capability >= 8.9)")


def layer_spec(impl: str):
    """megatron-core local layers (anywhere) or Transformer Engine layers (GPU nodes). Both give
    the same checkpoint keys (the local spec maps its norms onto TE's fused names); TE adds
    `_extra_state` entries (FP8 metadata), see `IMPL_ONLY_SUFFIXES`."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if impl == "local":
        return specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if impl == "transformer_engine":
        if not te_available():
            raise ImportError(
                "model.transformer_impl=transformer_engine needs Transformer Engine: "
                "pip install 'nemo_avllm[gpu]' on a CUDA node, or set model.transformer_impl=auto/local"
            )
        return specs.get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.transformer_impl={impl!r}; expected one of {TRANSFORMER_IMPLS}")


# Checkpoint entries one layer implementation has and the other does not (TE's FP8 metadata):
# loading across implementations skips them.
IMPL_ONLY_SUFFIXES = ("._extra_state",)


def impl_only_key(key: str) -> bool:
    return key.endswith(IMPL_ONLY_SUFFIXES)


def build_gpt(llm: LLMConfig, config, impl: str = "local", pre_process: bool = True, post_process: bool = True):
    """One pipeline stage of the LLM as a megatron-core `GPTModel` (`RopePositionsGPT`)."""
    return build_with_megatron_linears(config, lambda: _gpt_class()(
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
    ))


_GPT_CLASS = None


def _gpt_class():
    """`GPTModel` whose RoPE can follow per-token position ids. megatron's RoPE uses positions
    0..s-1 of the row (or restarts per `cu_seqlens` segment in THD); packed rows on the local spec
    (bshd with a block mask) need positions that restart per sample: `forward(...,
    rope_position_ids=[b, s])`. Same parameters and checkpoint keys as `GPTModel`."""
    global _GPT_CLASS
    if _GPT_CLASS is not None:
        return _GPT_CLASS
    from megatron.core.models.gpt import GPTModel

    class RopePositionsGPT(GPTModel):
        _rope_position_ids = None

        def forward(self, *args, rope_position_ids=None, **kwargs):
            self._rope_position_ids = rope_position_ids
            try:
                return super().forward(*args, **kwargs)
            finally:
                self._rope_position_ids = None

        def _preprocess(self, *args, **kwargs):
            out = super()._preprocess(*args, **kwargs)
            pos = self._rope_position_ids
            if pos is None or out[1] is None:
                return out
            table = self.rotary_pos_emb(pos.shape[1])  # [s, 1, 1, d]
            freqs = table[:, 0, 0][pos.t().to(table.device)].unsqueeze(2)  # [s, b, 1, d]
            return (out[0], freqs, *out[2:])

    _GPT_CLASS = RopePositionsGPT
    return _GPT_CLASS
