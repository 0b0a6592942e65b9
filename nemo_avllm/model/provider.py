"""Model provider: `cfg.model` (conf/model/*.yaml) -> the AVLLM stage for this rank.

Megatron-Bridge habit: one function that knows how a config becomes modules; the training
loop, export and inference all call it instead of assembling models themselves."""

from __future__ import annotations

import torch

from nemo_avllm.config import to_dict
from nemo_avllm.errors import UserError
from nemo_avllm.model.avllm import AVLLM, AVLLMConfig
from nemo_avllm.model.encoders import VisionEncoderConfig, audio_config_class
from nemo_avllm.model.llm import LLMConfig, resolve_transformer_impl, transformer_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODERS = ("vision", "audio")
# What each frozen encoder's weights are, for messages that name the key to set.
ENCODER_WEIGHTS = {
    "vision": "open_clip ViT-L-14-quickgelu OpenAI weights (or an HF CLIP folder)",
    "audio": "laion_clap 630k-audioset-best.pt (or an HF CLAP folder; with model.audio.type=whisper an HF Whisper folder)",
}


def _dtype(name: str, key: str = "model.params_dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def encoder_dtype(model_cfg) -> torch.dtype:
    """The dtype the frozen encoders run in (`model.encoder_dtype`), independent of the LLM's.

    `auto`: bf16 with a GPU, fp32 on CPU (CPU bf16 convolutions and attention are slow and gain
    nothing). Inputs are cast to it by the encoders, outputs by the projectors."""
    name = str(model_cfg.get("encoder_dtype", "auto"))
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _dtype(name, "model.encoder_dtype")


def _section(cls, d: dict, where: str):
    known = set(cls.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def avllm_config(model_cfg) -> AVLLMConfig:
    d = to_dict(model_cfg)
    return AVLLMConfig(
        llm=LLMConfig.from_dict(d["llm"]),
        vision=_section(VisionEncoderConfig, d["vision"], "model.vision"),
        audio=_section(audio_config_class(d["audio"].get("type")),
                       {k: tuple(v) if isinstance(v, list) else v for k, v in d["audio"].items()}, "model.audio"),
        num_frames=int(d["num_frames"]),
        num_audio_segments=int(d["num_audio_segments"]),
        transformer_impl=resolve_transformer_impl(d.get("transformer_impl", "auto")),
        build_encoders=bool(d.get("build_encoders", True)),
        encoder_dtype=encoder_dtype(model_cfg),
    )


def _check_parallel(model_cfg, tp: int) -> None:
    """Parallel settings this model cannot run, refused with what to do instead."""
    cp = int(model_cfg.get("context_parallel_size", 1) or 1)
    if cp != 1:
        raise ValueError(
            f"model.context_parallel_size={cp}: context parallelism is not supported here (the modality splice "
            f"and the selective encoders need each sample's whole sequence on one rank); use "
            f"model.sequence_parallel=true with tensor parallelism for long sequences, and context_parallel_size=1"
        )
    seq = model_cfg.get("seq_length")
    if bool(model_cfg.get("sequence_parallel", False)) and tp > 1 and seq is not None and int(seq) % tp:
        raise ValueError(
            f"model.seq_length={seq} must be divisible by tensor_model_parallel_size={tp} with "
            f"model.sequence_parallel=true (each TP rank holds seq_length/TP positions)"
        )


def megatron_config(model_cfg, init_model_with_meta_device: bool = False):
    """The megatron `TransformerConfig` of `cfg.model` (validated: TP/PP vs heads/layers, SP, CP, FP8...)."""
    tp = int(model_cfg.get("tensor_model_parallel_size", 1))
    _check_parallel(model_cfg, tp)
    first = model_cfg.get("num_layers_in_first_pipeline_stage")
    return transformer_config(
        LLMConfig.from_dict(to_dict(model_cfg.llm)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=int(model_cfg.get("pipeline_model_parallel_size", 1)),
        params_dtype=_dtype(model_cfg.get("params_dtype", "fp32")),
        recompute=bool(model_cfg.get("activations_checkpoint", False)),
        sequence_parallel=bool(model_cfg.get("sequence_parallel", False)),
        init_model_with_meta_device=init_model_with_meta_device,
        # megatron's GPU init path allocates on `torch.cuda.current_device()` explicitly, past a
        # meta-device context: a meta build takes the CPU path, whose allocations follow the context
        use_cpu_initialization=True if init_model_with_meta_device else None,
        impl=resolve_transformer_impl(model_cfg.get("transformer_impl", "auto")),
        fp8=model_cfg.get("fp8"),
        fp8_recipe=model_cfg.get("fp8_recipe", "delayed"),
        num_layers_in_first_pipeline_stage=int(first) if first is not None else None,
    )


def build_model(
    model_cfg, pre_process: bool | None = None, post_process: bool | None = None, meta: bool = False
) -> AVLLM:
    """The AVLLM stage of this pipeline rank (first stage: encoders + projectors + embedding).

    `meta=True` builds every tensor on the meta device: shapes and names of a 7B/13B model
    without allocating its weights (export layouts, parameter counts). Frozen encoders are left
    out then (torchlibrosa fills its STFT weights from NumPy, which meta tensors refuse); their
    widths still come from their configs."""
    import contextlib

    from megatron.core import parallel_state

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    cfg = avllm_config(model_cfg)
    if meta:
        cfg.build_encoders = False
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = AVLLM(
            cfg,
            megatron_config(model_cfg, init_model_with_meta_device=meta),
            pre_process=pre_process,
            post_process=post_process,
        )
    dtype = _dtype(model_cfg.get("params_dtype", "fp32"))
    if dtype != torch.float32:
        # LLM and projectors train in bf16/fp16; the frozen encoders keep the dtype AVLLM gave
        # them (model.encoder_dtype)
        for name, child in model.named_children():
            if name not in ENCODERS:
                child.to(dtype)
    return model


def check_encoder_weights(model_cfg, provided: tuple[str, ...] = ()) -> None:
    """Refuse frozen encoders that would keep their random initial weights: each built encoder
    needs `model.<name>.checkpoint`, or its weights in a checkpoint being restored (`provided`
    names those), or `model.allow_random_init=true` (tests, the synthetic demo)."""
    if not model_cfg.get("build_encoders", True) or model_cfg.get("allow_random_init", False):
        return
    for name in ENCODERS:
        if not model_cfg[name].get("checkpoint") and name not in provided:
            raise UserError(
                f"model.{name}.checkpoint is null: the frozen {name} encoder would keep random weights. Set "
                f"model.{name}.checkpoint=<{ENCODER_WEIGHTS[name]}>, or model.allow_random_init=true to "
                f"run with a random encoder on purpose"
            )
