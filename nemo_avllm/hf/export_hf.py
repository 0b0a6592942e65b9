"""`avllm export-hf`: any dist checkpoint (any TP/PP, final or intermediate) -> a Hugging Face folder.

The checkpoint is read into a TP=1/PP=1 model (dist checkpointing reshards on load, so every
saved layout works, and optimizer state is never read), then each component is written in its
public format (layout: `nemo_avllm.hf.hf_model`): the LLM as `LlamaForCausalLM`, the encoders
as `CLIPVisionModelWithProjection` and `ClapAudioModel` (HTSAT) or `WhisperEncoder`, the projectors, the config (T, N, K, token
ids, preprocessing) and the tokenizer with `<VIS>`, `<AUD>`, `<AUD_VIS>` added as special tokens.
Safetensors only.

Memory: the model is allocated once, empty (no random init), and loaded in place in the
checkpoint's dtype (SwiGLU fc1 as whole tensors: `common.whole_swiglu`); files are written one
tensor at a time (`write_safetensors`). The peak is the model plus dist checkpointing's read
buffers (about two of the largest tensors); see bench/bench_export.py. The folder appears only
when complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nemo_avllm.errors import UserError
from nemo_avllm.hf import encoders_bridge, llama_bridge
from nemo_avllm.hf.common import (
    DTYPE_NAMES,
    dtype_name,
    empty_model,
    load_tensors,
    missing_tensors,
    single_process,
    staged_folder,
)
from nemo_avllm.hf.tensor_files import write_safetensors
from nemo_avllm.modality import MODALITY_TOKENS
from nemo_avllm.model.llm import LLMConfig

log = logging.getLogger(__name__)

VISION_PREFIX = "vision.visual."
AUDIO_PREFIXES = {"htsat": "audio.htsat.", "whisper": "audio.whisper."}  # by model.audio.type


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _write(path: Path, tensors, dtype: torch.dtype, shapes: dict | None = None) -> None:
    """Stream `tensors` to a safetensors file, floating-point ones in `dtype`. A lazy mapping
    (the LLM's) comes with its `shapes`, so that no tensor is made before it is written."""
    if shapes is not None:
        specs = {name: (shapes[name], dtype) for name in tensors}
    else:
        specs = {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for name, t in tensors.items()}
    write_safetensors(path, specs, lambda n: _cast(tensors[n], dtype), metadata={"format": "pt"})


def _generation_config(tok):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


class MissingWeightsError(UserError):
    """The checkpoint lacks tensors the export needs."""




def _strip(full: dict, prefix: str) -> dict:
    """The tensors under `prefix`, without it."""
    return {n[len(prefix):]: t for n, t in full.items() if n.startswith(prefix)}


def _write_encoder(folder: Path, hf_cfg, tensors: dict, dtype) -> None:
    """One encoder as a Hugging Face folder: config.json + model.safetensors."""
    folder.mkdir()
    _write(folder / "model.safetensors", tensors, dtype)
    hf_cfg.torch_dtype = dtype
    hf_cfg.save_pretrained(folder)

def _encoder(kind: str, section, saved: set[str], fallback: str | None, dtype: torch.dtype):
    """The vision/audio encoder of `section` (the typed model config) to export: its weights come
    from the checkpoint when training built it, else from an encoder checkpoint file (training on
    cached features never has them)."""
    import dataclasses

    from nemo_avllm.model.encoders import VisionEncoder, build_audio_encoder

    enc_cfg = dataclasses.replace(section.vision if kind == "vision" else section.audio)  # its checkpoint is set here
    in_ckpt = any(k.startswith(VISION_PREFIX if kind == "vision" else AUDIO_PREFIXES[enc_cfg.type]) for k in saved)
    path = fallback or enc_cfg.checkpoint
    if not in_ckpt and not path:
        raise MissingWeightsError(
            f"the checkpoint holds no {kind} encoder weights (it was trained on cached features or is an "
            f"import-hf checkpoint); give {kind}_checkpoint=<{'open_clip or HF CLIP' if kind == 'vision' else 'laion_clap or HF CLAP (HF Whisper for a Whisper model)'} "
            f"weights> or export the LLM alone with llm_only=true"
        )
    enc_cfg.checkpoint = None if in_ckpt else path
    encoder = (VisionEncoder if kind == "vision" else build_audio_encoder)(enc_cfg).to(dtype)
    return encoder, in_ckpt


def _tokenizer(path: str | None):
    from nemo_avllm.data.tokenizer import load_tokenizer

    if not path:
        raise ValueError("no tokenizer: give tokenizer=<Hugging Face tokenizer folder> (the checkpoint's model.tokenizer is null)")
    return load_tokenizer(path)


def chat_template() -> str:
    """A Jinja `chat_template` for the training template (`data.conversation`: Vicuna v1.1 with the
    paper's system prompt and modality tokens in user turns), so `tokenizer.apply_chat_template(...,
    add_generation_prompt=True)` gives the ids of `avllm generate`'s prompt. Training encodes the text
    around each special token (`<s>`, `</s>`, modality tokens) on its own, with SentencePiece's word
    start; the template's spacing reproduces that: a space after each of them, none before a token."""
    from nemo_avllm.data.conversation import ConversationTemplate

    t = ConversationTemplate()
    user = "((' " + t.human_role + ": ' + (m['content'] | trim))" + "".join(
        f" | replace(' {tok}', '{tok}') | replace('{tok}', '{tok} ') | replace('{tok}  ', '{tok} ')"
        for tok in MODALITY_TOKENS) + ")"
    system = t.system_prompt.replace("'", "\\'")
    return ("{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{{ ' ' + (messages[0]['content'] | trim) }}"
            "{% set turns = messages[1:] %}{% else %}{{ ' " + system + "' }}{% set turns = messages %}{% endif %}"
            "{% for m in turns %}{% if m['role'] == 'user' %}{{ " + user + " }}"
            "{% elif m['role'] == 'assistant' %}{{ ' " + t.assistant_role + ": ' + (m['content'] | trim) + eos_token }}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' " + t.assistant_role + ":' }}{% endif %}")


def hf_tokenizer(tok) -> dict[str, int]:
    """The export's tokenizer: modality tokens added, the training template as its chat_template."""
    ids = _add_modality_tokens(tok)
    tok.chat_template = chat_template()
    return ids


def _add_modality_tokens(tok) -> dict[str, int]:
    """Add `<VIS>`, `<AUD>`, `<AUD_VIS>` as special tokens (kept if present). Returns their ids."""
    import inspect

    new = [t for t in MODALITY_TOKENS if t not in set(tok.all_special_tokens)]
    if new:
        if "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters:  # transformers 5
            tok.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
        else:
            tok.add_special_tokens({"additional_special_tokens": new}, replace_additional_special_tokens=False)
    return {t: tok.convert_tokens_to_ids(t) for t in MODALITY_TOKENS}


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    tokenizer: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    llm_only: bool = False,
    vision_checkpoint: str | None = None,
    audio_checkpoint: str | None = None,
) -> Path:
    """Write the Hugging Face folder of `checkpoint` to `out`; returns `out`."""
    # transformers' model modules must be imported before megatron's CPU shims are applied
    # (`single_process`): the shims replace torch.cuda.Stream, which they use in annotations.
    from nemo_avllm.hf import hf_model  # noqa: F401
    from nemo_avllm.model.parallel_layout import local_tensors
    from nemo_avllm.model.provider import avllm_config
    from nemo_avllm.training import checkpoint as dist_ckpt

    ckpt = Path(checkpoint)
    cfg = dist_ckpt.model_config(ckpt)
    cfg.tensor_model_parallel_size = cfg.pipeline_model_parallel_size = 1
    cfg.transformer_impl = "local"  # checkpoint keys are the same for both layer specs
    cfg.build_encoders = False
    section = avllm_config(cfg)  # the typed model config, read once
    llm = section.llm
    ckpt_dtype = DTYPE_NAMES[cfg.get("params_dtype", "fp32")]
    out_dtype = DTYPE_NAMES[dtype_name(dtype, cfg.get("params_dtype", "fp32"))]
    tok = _tokenizer(tokenizer or cfg.get("tokenizer"))
    base = len(tok) - sum(t in tok.get_vocab() for t in MODALITY_TOKENS)
    if base > llm.vocab_size:
        raise ValueError(f"the tokenizer has {base} tokens but the LLM's vocab_size is {llm.vocab_size}: not this model's tokenizer")
    saved = dist_ckpt.tensor_keys(ckpt)

    with single_process(), staged_folder(out, overwrite) as tmp:
        model = empty_model(cfg, llm_only=llm_only)
        missing = missing_tensors(ckpt, model)
        if missing:
            what = "projector" if all(k.startswith("proj_") for k in missing) else "model"
            hint = "; it holds only the LLM (an import-hf checkpoint?): export it with llm_only=true" if what == "projector" else ""
            raise MissingWeightsError(f"{ckpt} lacks {len(missing)} {what} tensors, e.g. {missing[:3]}{hint}")
        encoders = {}
        if not llm_only:
            for kind, fallback in (("vision", vision_checkpoint), ("audio", audio_checkpoint)):
                enc, from_ckpt = _encoder(kind, section, saved, fallback, ckpt_dtype)
                encoders[kind] = enc
                if from_ckpt:
                    setattr(model, kind, enc)  # loaded with the model below
        load_tensors(ckpt, model)
        full = {n: t.detach() for n, t in local_tensors(model).items()}
        for kind, enc in encoders.items():
            full.update({f"{kind}.{n}": t.detach() for n, t in enc.state_dict().items()})
        _write_llm(tmp, llm, full, out_dtype, tok)
        if not llm_only:
            _write_avllm(tmp, section, full, out_dtype, tok)
        del model, full, encoders
    log.info("exported %s -> %s", ckpt, out)
    return Path(out)


def _write_llm(folder: Path, llm: LLMConfig, full: dict, dtype: torch.dtype, tok) -> None:
    """llm/: a plain LlamaForCausalLM folder with the LLM's own tokenizer."""
    from nemo_avllm.hf.hf_model import LLM_DIR

    d = folder / LLM_DIR
    d.mkdir()
    shapes = llama_bridge.hf_shapes(llm)
    _write(d / "model.safetensors", llama_bridge.to_hf(llm, full.__getitem__), dtype, shapes)
    llama_bridge.hf_llama_config(llm, dtype, tok.bos_token_id, tok.eos_token_id).save_pretrained(d)
    _generation_config(tok).save_pretrained(d)
    tok.save_pretrained(d)


def _write_avllm(folder: Path, section, full: dict, dtype: torch.dtype, tok) -> None:
    """vision/, audio/, projectors, config.json and the tokenizer with the modality tokens, from
    `section` (the typed model config)."""
    from nemo_avllm import modality
    from nemo_avllm.hf import hf_model
    geo = section.vision.geometry()
    # vision: open_clip -> CLIPVisionModelWithProjection; audio: laion HTSAT -> ClapAudioModel, or WhisperEncoder
    vision_cfg = encoders_bridge.clip_vision_config(section.vision)
    audio_cfg, audio_sd = encoders_bridge.hf_audio(section.audio, _strip(full, AUDIO_PREFIXES[section.audio.type]))
    _write_encoder(folder / hf_model.VISION_DIR, vision_cfg, encoders_bridge.open_clip_to_hf(_strip(full, VISION_PREFIX)), dtype)
    _write_encoder(folder / hf_model.AUDIO_DIR, audio_cfg, audio_sd, dtype)
    # projectors: megatron ColumnParallelLinear -> nn.Linear (same [out, in] layout)
    proj = {f"{p}.{n}": full[f"{p}.linear.{n}"] for p in hf_model.PROJECTORS for n in ("weight", "bias")}
    _write(folder / hf_model.PROJECTORS_FILE, proj, dtype)
    # tokenizer (with the training template as its chat_template) + config
    ids = hf_tokenizer(tok)
    tok.save_pretrained(folder)
    f = section.vision.feature_layer
    block = geo["layers"] + f if f < 0 else f  # the ViT block whose output is used
    config = hf_model.AVLLMConfig(
        text_config=llama_bridge.hf_llama_config(section.llm, dtype, tok.bos_token_id, tok.eos_token_id),
        vision_config=vision_cfg,
        audio_config=audio_cfg,
        num_frames=section.num_frames,
        num_patches=geo["num_patches"],
        num_audio_segments=section.num_audio_segments,
        vision_feature_layer=block + 1,  # hidden_states[0] is the embedding output
        vis_token_id=ids[modality.VIS_TOKEN],
        aud_token_id=ids[modality.AUD_TOKEN],
        aud_vis_token_id=ids[modality.AUD_VIS_TOKEN],
        image_size=geo["image_size"],
        image_mean=list(section.vision.mean),
        image_std=list(section.vision.std),
        sample_rate=section.audio.sample_rate,
        clip_samples=section.audio.clip_samples,
        # HTSAT's front end settings (Whisper's front end is fixed by its config)
        **({k: getattr(section.audio, k) for k in ("window_size", "hop_size", "mel_bins", "fmin", "fmax")}
           if section.audio.type == "htsat" else {}),
        architectures=["AVLLMForConditionalGeneration"],
        torch_dtype=dtype,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.save_pretrained(folder)
    _generation_config(tok).save_pretrained(folder)


def run(cfg) -> Path:
    """Hydra entry point: conf/export_hf.yaml."""
    out = export_hf(
        cfg.checkpoint,
        cfg.out,
        tokenizer=cfg.get("tokenizer"),
        dtype=cfg.get("dtype"),
        overwrite=bool(cfg.get("overwrite", False)),
        llm_only=bool(cfg.get("llm_only", False)),
        vision_checkpoint=cfg.get("vision_checkpoint"),
        audio_checkpoint=cfg.get("audio_checkpoint"),
    )
    print(f"export-hf: wrote {out}")
    return out
