"""GPU memory per rank of a training configuration, estimated before a job starts.

Why: a 7B run that does not fit fails minutes into start-up (after loading weights), on every
rank; the plan names the predicted total and what to change before any of that.

Parameters (exact). The provider's own model is built once on the meta device at TP=1/PP=1
(megatron local layer spec; both specs have the same parameters) inside a private one-process
gloo group. A parameter megatron marks `tensor_model_parallel` is split evenly over the TP ranks
(`padded_vocab`, heads, ffn are checked divisible by TP), so a rank holds numel/TP of it and all
of every other parameter. Pipeline stages hold their layers (`llm.stage_layers`); stage 0 also
the embedding, the projectors and the frozen encoders, the last stage the final norm and the
output layer. The encoders are built on CPU where meta tensors fail (HTSAT's STFT weights).

Bytes per GPU, for each pipeline stage; the plan reports the most loaded one:
- weights: LLM + projectors in `model.params_dtype` (bf16: 2 bytes/param); frozen encoders in
  `model.encoder_dtype` (`auto` = bf16 on a GPU), only when they are built (no feature cache).
- gradients: megatron DDP keeps an fp32 grad buffer (`grad_reduce_in_fp32`) for trainable
  parameters: 4 bytes/param, not sharded by the distributed optimizer. Stage 1 trains the
  projectors only, stage 2 the projectors and the whole LLM (`model.trainable`).
- optimizer: Adam's fp32 master copy + exp_avg + exp_avg_sq = 12 bytes/trainable param,
  divided by DP with the distributed optimizer (`auto` = on with GPUs).
- activations, bf16 (2 bytes/element), by the method of Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models" (their GPT layer: s*b*h*(34 + 5*a*s/h)),
  redone for the LLaMA layer (RMSNorm, SwiGLU with ffn f, no dropout, no biases), s = seq_length,
  b = micro-batch, h = hidden, a = heads, g/a = KV groups per head, t = TP. Per layer, what
  autograd keeps for the backward:
    norm inputs (TE's fused RMSNorm keeps its input)         4sbh      replicated over TP
    q, k, v after RoPE (attention backward)                  2sbh(1+2g/a)   split by TP
    SwiGLU input gate|up (megatron's fused bias-SwiGLU)      4sbf      split by TP
    softmax probabilities, unfused attention only            2as^2b    split by TP
    attention output (flash keeps it; out-proj input)        2sbh      split by TP
  plus, only when the LLM trains (megatron's frozen-weight linear keeps no input, as no
  weight gradient is needed): QKV and fc1 inputs 4sbh replicated, fc2 input 2sbf split.
  Trained, flash attention: 16sbh + 6sbf (Vicuna-7B: 32.1 sbh against GPT's 34 sbh); the
  attention output counts for a frozen LLM only with flash attention (the unfused path keeps
  the probabilities instead). Sequence parallelism divides the replicated part by t too.
  Full recompute (megatron `full`/`uniform`, 1 layer per checkpoint) keeps each layer's input
  2sbh (/t with SP) plus one layer's activations while it is recomputed. Last stage: final-norm
  input 2sbh, output-layer input 2sbh when the LLM trains, logits 2sbv/t (bf16) + the fp32
  softmax kept by megatron's cross entropy 4sbv/t (v = padded vocab). In flight under 1F1B:
  stage k holds min(PP - k, micro-batches per step) micro-batches' layer activations; the
  recompute buffer and the logits count once. Flash attention (`flash_attention=True`, TE's
  fused attention on GPU nodes) drops the a*s^2 term. Not counted: projector inputs (< 10 MB),
  the encoders' no-grad forward (freed before the LLM runs; ViT-L/14 on 8 clips x 32 frames
  peaks near 1 GB, below one micro-batch of LLM activations), allocator fragmentation.
- workspace: a fixed `WORKSPACE_GIB` for the CUDA context, cuBLAS/TE workspaces and NCCL
  communicator buffers.

An estimate from formulas, not yet checked against a GPU's measured peak."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass

import torch

GIB = 1024**3
WORKSPACE_GIB = 2.5
ADAM_BYTES = 12  # fp32 master weight + exp_avg + exp_avg_sq
GRAD_BYTES = 4  # megatron DDP grad buffer with grad_reduce_in_fp32
ACT_BYTES = 2  # bf16 activations


@dataclass(frozen=True)
class Inventory:
    """Parameter counts of the full (TP=1, PP=1) model: (TP-split numel, replicated numel) per
    group, one entry per LLM layer; encoder counts with their element size."""

    embedding: tuple[int, int]
    layers: tuple[tuple[int, int], ...]
    final_norm: tuple[int, int]
    output: tuple[int, int]
    projectors: tuple[int, int]
    encoders: int
    param_bytes: int
    encoder_bytes: int

    def llm_params(self) -> int:
        groups = (self.embedding, *self.layers, self.final_norm, self.output)
        return sum(split + rep for split, rep in groups)


@contextlib.contextmanager
def _one_process_groups():
    """megatron's parallel state for one process (TP=PP=DP=1), needed to build a GPTModel; a
    private in-memory store, so it touches no launcher variables and no ports. Torn down after,
    so a training run can initialise its own groups."""
    from megatron.core import parallel_state as ps

    if torch.distributed.is_initialized():
        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == 1 \
                and ps.get_pipeline_model_parallel_world_size() == 1:
            yield  # e.g. a test's single-process group: the TP=1/PP=1 build works in it
            return
        raise RuntimeError("the memory plan builds a TP=1/PP=1 model: call it before torch.distributed is initialised")
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(1, 1)
        yield
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _encoder_params(avllm_cfg) -> int:
    """Parameters of the frozen encoders (meta where their constructors allow it, else CPU)."""
    from nemo_avllm.model.encoders import VisionEncoder, build_audio_encoder

    total = 0
    for build in (lambda: VisionEncoder(avllm_cfg.vision), lambda: build_audio_encoder(avllm_cfg.audio)):
        try:
            with torch.device("meta"):
                module = build()
        except (RuntimeError, NotImplementedError, TypeError):
            module = build()
        total += sum(p.numel() for p in module.parameters())
    return total


def _split(params) -> tuple[int, int]:
    params = list(params)
    split = sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))
    return split, sum(p.numel() for p in params) - split


# the keys of `cfg.model` that decide parameter shapes and dtypes (parallel sizes do not: the
# inventory is the TP=1/PP=1 model)
_ARCH_KEYS = ("llm", "vision", "audio", "num_frames", "num_audio_segments", "params_dtype", "encoder_dtype")


@functools.lru_cache(maxsize=8)
def _inventory(model_json: str) -> Inventory:
    from omegaconf import OmegaConf

    from nemo_avllm.model.provider import DTYPES, build_model

    model_cfg = OmegaConf.merge(OmegaConf.create(json.loads(model_json)), {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "transformer_impl": "local"})
    with _one_process_groups():
        model = build_model(model_cfg, pre_process=True, post_process=True, meta=True)
    llm = model.llm
    enc_name = str(model_cfg.get("encoder_dtype", "auto"))
    return Inventory(
        embedding=_split(llm.embedding.parameters()),
        layers=tuple(_split(layer.parameters()) for layer in llm.decoder.layers),
        final_norm=_split(llm.decoder.final_layernorm.parameters()),
        output=_split(llm.output_layer.parameters()),
        projectors=_split([p for n, p in model.named_parameters() if n.startswith("proj_")]),
        encoders=_encoder_params(model.cfg),  # the typed config the model was built from
        param_bytes=torch.empty((), dtype=DTYPES[model_cfg.get("params_dtype", "fp32")]).element_size(),
        # the plan is for a GPU, where encoder_dtype auto means bf16
        encoder_bytes=torch.empty((), dtype=DTYPES["bf16" if enc_name == "auto" else enc_name]).element_size(),
    )


def inventory(model_cfg) -> Inventory:
    """Parameter counts of `cfg.model` (cached per architecture: one meta build per process)."""
    from nemo_avllm.config import to_dict

    arch = {k: v for k, v in to_dict(model_cfg).items() if k in _ARCH_KEYS}
    return _inventory(json.dumps(arch, sort_keys=True, default=str))


def layer_activation_bytes(llm, seq: int, mbs: int, tp: int, sp: bool, trainable: bool, flash: bool) -> float:
    """Bytes one LLaMA layer keeps for the backward of one micro-batch (table in the module doc)."""
    s, b, h, f, a = seq, mbs, llm.hidden_size, llm.ffn_hidden_size, llm.num_attention_heads
    sbh = s * b * h
    replicated = 4 * sbh
    split = 2 * sbh * (1 + 2 * llm.kv_groups / a) + 4 * s * b * f
    if trainable:
        replicated += 4 * sbh
        split += 2 * s * b * f
    if trainable or flash:
        split += 2 * sbh
    if not flash:
        split += 2 * a * s * s * b
    return (replicated + split) / tp if sp else replicated + split / tp


@dataclass(frozen=True)
class Layout:
    """What the plan is for: parallel sizes, batch shape and the switches that change memory."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    seq_length: int
    micro_batches: int  # per step and DP rank: global batch / (micro-batch x DP)
    recompute: bool
    trains_llm: bool
    distributed_optimizer: bool
    sequence_parallel: bool = False
    encoders: bool = True
    flash_attention: bool = True
    first_stage_layers: int | None = None


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU on the most loaded pipeline stage (`stage`)."""

    stage: int
    weights: float  # LLM + projectors
    encoders: float  # frozen encoders (0 when not built)
    gradients: float
    optimizer: float
    activations: float  # with the layout's recompute setting
    activations_no_recompute: float
    activations_recompute: float
    workspace: float
    layout: Layout

    @property
    def total(self) -> float:
        return self.weights + self.encoders + self.gradients + self.optimizer + self.activations + self.workspace

    def components(self) -> dict[str, float]:
        return {"weights": self.weights, "encoders": self.encoders, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations,
                "activations_no_recompute": self.activations_no_recompute,
                "activations_recompute": self.activations_recompute, "workspace": self.workspace, "total": self.total}


def _stage(inv: Inventory, llm, lay: Layout, k: int) -> MemoryPlan:
    from nemo_avllm.model.llm import stage_layers

    counts = stage_layers(len(inv.layers), lay.pp, lay.first_stage_layers)
    first, last = k == 0, k == lay.pp - 1
    start = sum(counts[:k])
    groups = list(inv.layers[start:start + counts[k]])
    groups += [inv.embedding] if first else []
    groups += [inv.final_norm, inv.output] if last else []
    llm_params = sum(split / lay.tp + rep for split, rep in groups)
    proj = inv.projectors[0] / lay.tp + inv.projectors[1] if first else 0
    trainable = proj + (llm_params if lay.trains_llm else 0)

    s, b, h, t = lay.seq_length, lay.micro_batch, llm.hidden_size, lay.tp
    per_layer = layer_activation_bytes(llm, s, b, t, lay.sequence_parallel, lay.trains_llm, lay.flash_attention)
    checkpoint = ACT_BYTES * s * b * h / (t if lay.sequence_parallel else 1)  # one layer's input
    in_flight = min(lay.pp - k, lay.micro_batches)
    once = 0.0
    if last:
        once += checkpoint * (2 if lay.trains_llm else 1)  # final-norm input (+ output-layer input)
        once += (ACT_BYTES + 4) * s * b * llm.padded_vocab_size / t  # bf16 logits + fp32 softmax
    no_recompute = in_flight * counts[k] * per_layer + once
    recompute = in_flight * counts[k] * checkpoint + per_layer + once
    return MemoryPlan(
        stage=k,
        weights=(llm_params + proj) * inv.param_bytes,
        encoders=inv.encoders * inv.encoder_bytes if first and lay.encoders else 0.0,
        gradients=trainable * GRAD_BYTES,
        optimizer=trainable * ADAM_BYTES / (lay.dp if lay.distributed_optimizer else 1),
        activations=recompute if lay.recompute else no_recompute,
        activations_no_recompute=no_recompute,
        activations_recompute=recompute,
        workspace=WORKSPACE_GIB * GIB,
        layout=lay,
    )


def plan(model_cfg, layout: Layout) -> MemoryPlan:
    """Memory per GPU of the most loaded pipeline stage of `cfg.model` under `layout`."""
    from nemo_avllm.config import to_dict
    from nemo_avllm.model.llm import LLMConfig

    llm = LLMConfig.from_dict(to_dict(model_cfg.llm))
    llm.validate(layout.tp, layout.pp, layout.first_stage_layers)
    inv = inventory(model_cfg)
    return max((_stage(inv, llm, layout, k) for k in range(layout.pp)), key=lambda p: p.total)


def layout_of(cfg, dp: int, **changes) -> Layout:
    """The layout a training config (`stage1_pretrain`, `stage2_finetune`) runs on a GPU node
    with `dp` data-parallel ranks; `changes` override fields (the CLI's flags)."""
    m = cfg.model
    data = m.get("data") or {}
    first = m.get("num_layers_in_first_pipeline_stage")
    fields = dict(
        tp=int(m.tensor_model_parallel_size), pp=int(m.pipeline_model_parallel_size), dp=dp,
        micro_batch=int(m.micro_batch_size), seq_length=int(m.seq_length),
        recompute=bool(m.get("activations_checkpoint", False)), trains_llm="llm" in list(m.trainable),
        # auto = on with GPUs, and the plan is for a GPU node
        distributed_optimizer=m.get("use_distributed_optimizer", "auto") in ("auto", True),
        sequence_parallel=bool(m.get("sequence_parallel", False)) and int(m.tensor_model_parallel_size) > 1,
        encoders=bool(m.get("build_encoders", True)) and not data.get("feature_cache"),
        first_stage_layers=int(first) if first is not None else None,
    )
    fields.update(changes)
    fields.setdefault("micro_batches", max(1, int(m.global_batch_size) // (fields["micro_batch"] * dp)))
    return Layout(**fields)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def check_fits(cfg, world_size: int, gpu_bytes: float) -> MemoryPlan:
    """Raise ValueError (one line: predicted total, its parts, the capacity, what to change) when
    the training config is predicted not to fit in `gpu_bytes` per GPU; else return the plan."""
    m = cfg.model
    dp = world_size // (int(m.tensor_model_parallel_size) * int(m.pipeline_model_parallel_size))
    p = plan(m, layout_of(cfg, max(dp, 1)))
    if p.total <= gpu_bytes:
        return p
    lay = p.layout
    fixes = [f"raise model.tensor_model_parallel_size (now {lay.tp}) or pipeline_model_parallel_size (now {lay.pp})"]
    if lay.micro_batch > 1:
        fixes.append(f"lower model.micro_batch_size (now {lay.micro_batch})")
    if not lay.recompute and p.activations_recompute < p.activations_no_recompute:
        fixes.append(f"set model.activations_checkpoint=true (activations {_gib(p.activations_recompute)} GiB instead "
                     f"of {_gib(p.activations_no_recompute)})")
    if not lay.distributed_optimizer and lay.dp > 1:
        fixes.append("set model.use_distributed_optimizer=true")
    raise ValueError(
        f"predicted {_gib(p.total)} GiB per GPU (weights {_gib(p.weights + p.encoders)}, gradients {_gib(p.gradients)}, "
        f"optimizer {_gib(p.optimizer)}, activations {_gib(p.activations)}, workspace {_gib(p.workspace)}; "
        f"TP{lay.tp} PP{lay.pp} DP{lay.dp}, pipeline stage {p.stage}) exceeds the GPU's {_gib(gpu_bytes)} GiB: "
        + ", or ".join(fixes) + " (bench/memory_plan.py shows the parts; trainer.gpu_memory_gib overrides the capacity)")


def gpu_capacity(cfg) -> float | None:
    """Bytes per GPU for the pre-flight check: `trainer.gpu_memory_gib` when set, else this
    process's CUDA device (LOCAL_RANK when each task sees all GPUs), else None (no check)."""
    override = (cfg.get("trainer") or {}).get("gpu_memory_gib")
    if override:
        return float(override) * GIB
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    return float(torch.cuda.get_device_properties(index).total_memory)


def preflight(cfg, world_size: int | None) -> MemoryPlan | None:
    """The check `avllm train` runs before starting: `check_fits` against `gpu_capacity`, when
    there is a capacity and a world size to check against."""
    capacity = gpu_capacity(cfg)
    if capacity is None or world_size is None:
        return None
    return check_fits(cfg, world_size, capacity)
