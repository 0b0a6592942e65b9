"""The frozen encoders written in their public Hugging Face formats: open_clip -> HF CLIP,
laion HTSAT -> HF CLAP, Whisper as it is (reading them back: `nemo_avllm.model.encoders.weights`,
whose rename rules this applies the other way; its docstring describes the formats)."""

from __future__ import annotations

import re

import torch

from nemo_avllm.model.encoders.weights import CLAP_RENAMES, CLIP_RENAMES, HTSAT_NOT_IN_HF, rename

_CLIP_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_LAION_QKV = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


# ---- open_clip -> HF CLIP -------------------------------------------------------------------------
def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip visual state dict (no `visual.` prefix) -> `CLIPVisionModelWithProjection` state dict."""
    out = {}
    for name, t in sd.items():
        m = _CLIP_IN_PROJ.match(name)
        if m:
            layer, kind = m.groups()
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = chunk
        elif name == "proj":
            out["visual_projection.weight"] = t.t()
        else:
            out[rename(name, CLIP_RENAMES,
                       "open_clip vision tensor {name!r} has no HF CLIP counterpart (unsupported ViT variant?)")] = t
    return out


def clip_vision_config(vision_cfg):
    """`CLIPVisionConfig` of an open_clip ViT (`nemo_avllm` VisionEncoderConfig)."""
    from transformers import CLIPVisionConfig

    oc = vision_cfg.open_clip_config()
    v = dict(oc["vision_cfg"])
    unsupported = {k: v[k] for k in ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool")
                   if v.get(k) not in (None, False)}
    if v.get("pool_type", "tok") != "tok":
        unsupported["pool_type"] = v["pool_type"]
    if unsupported:
        raise ValueError(f"open_clip vision config of {vision_cfg.model_name} uses {unsupported}, which HF CLIPVisionModel cannot express")
    width = v.get("width", 768)
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v.get("layers", 12),
        num_attention_heads=width // v.get("head_width", 64),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 16),
        projection_dim=oc["embed_dim"],
        hidden_act="quick_gelu" if oc.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,
        architectures=["CLIPVisionModelWithProjection"],
    )


# ---- laion HTSAT -> HF CLAP ----------------------------------------------------------------------
def laion_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """laion HTSAT state dict (no `module.audio_branch.` prefix) -> `ClapAudioModel` state dict."""
    out = {}
    for name, t in sd.items():
        if name.startswith(HTSAT_NOT_IN_HF):
            continue
        m = _LAION_QKV.match(name)
        if m:
            stage, block, kind = m.groups()
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                out[f"audio_encoder.layers.{stage}.blocks.{block}.attention.self.{part}.{kind}"] = chunk
            continue
        out[rename(name, CLAP_RENAMES,
                   "laion HTSAT tensor {name!r} has no HF ClapAudioModel counterpart (fusion checkpoint?)")] = t
    return out


def clap_audio_config(audio_cfg):
    """`ClapAudioConfig` of a laion HTSAT (`nemo_avllm` AudioEncoderConfig); non-fusion models only."""
    from transformers import ClapAudioConfig

    arch = audio_cfg.arch()
    return ClapAudioConfig(
        patch_embeds_hidden_size=arch["embed_dim"],
        depths=list(arch["depths"]),
        num_attention_heads=list(arch["num_heads"]),
        hidden_size=audio_cfg.width,
        window_size=8,
        spec_size=256,
        patch_size=4,
        patch_stride=[4, 4],
        num_mel_bins=audio_cfg.mel_bins,
        enable_fusion=False,
        hidden_act="gelu",
        mlp_ratio=4.0,
        qkv_bias=True,
        layer_norm_eps=1e-5,
        num_classes=527,
        architectures=["ClapAudioModel"],
    )


def hf_audio(audio_cfg, sd: dict[str, torch.Tensor]):
    """(transformers config, state dict) of the audio encoder in its public HF format, from the
    training encoder's own state dict: HTSAT -> `ClapAudioModel`, Whisper -> `WhisperEncoder`."""
    if audio_cfg.type == "whisper":
        return audio_cfg.hf_config(), dict(sd)
    return clap_audio_config(audio_cfg), laion_to_hf(sd)
