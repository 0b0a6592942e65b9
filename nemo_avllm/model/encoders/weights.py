"""Public encoder checkpoints read into our encoders: open_clip or Hugging Face CLIP -> the open_clip
vision tower, laion_clap or Hugging Face CLAP -> laion's HTSAT, any Hugging Face Whisper -> the
`WhisperEncoder`. The rename rules are the two formats' correspondence; `nemo_avllm.hf.encoders_bridge`
uses them the other way round to export.

Vision: an open_clip `VisionTransformer` state dict (`visual.*` in a full CLIP checkpoint) and HF
`CLIPVisionModel`/`CLIPVisionModelWithProjection` (`vision_model.*`, `visual_projection.weight`;
a full `CLIPModel` also works) differ by names, by open_clip's fused attention input projection
(`in_proj_weight` = [q; k; v]) and by the projection, stored transposed (`proj` [width, dim] vs
`visual_projection.weight` [dim, width]).

Audio: a laion_clap checkpoint (630k-audioset layout: `module.audio_branch.*`) and HF
`ClapAudioModel` (`audio_encoder.*`; inside `ClapModel`: `audio_model.audio_encoder.*`) differ by
names and by laion's fused `attn.qkv`. laion's STFT/log-mel front end (`spectrogram_extractor`,
`logmel_extractor`) is a fixed function of the config, and its AudioSet head (`tscam_conv`,
`head`) is not used for embeddings: HF has neither, so they are dropped on the way to HF and
rebuilt from the config on the way back.
"""

from __future__ import annotations

import re

import torch

# Rename rules: pairs of name patterns, `{i}`/`{j}` stand for layer/block numbers. A pattern that
# ends with "." renames a prefix (weight, bias, ...), any other renames a whole name.
CLIP_RENAMES = [  # open_clip visual <-> HF CLIPVisionModelWithProjection
    ("class_embedding", "vision_model.embeddings.class_embedding"),
    ("conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("ln_pre.", "vision_model.pre_layrnorm."),
    ("ln_post.", "vision_model.post_layernorm."),
    ("transformer.resblocks.{i}.ln_1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("transformer.resblocks.{i}.ln_2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("transformer.resblocks.{i}.attn.out_proj.", "vision_model.encoder.layers.{i}.self_attn.out_proj."),
    ("transformer.resblocks.{i}.mlp.c_fc.", "vision_model.encoder.layers.{i}.mlp.fc1."),
    ("transformer.resblocks.{i}.mlp.c_proj.", "vision_model.encoder.layers.{i}.mlp.fc2."),
]
_HF_CLIP_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


CLAP_RENAMES = [  # laion HTSAT <-> HF ClapAudioModel
    ("bn0.", "audio_encoder.batch_norm."),
    ("patch_embed.", "audio_encoder.patch_embed."),
    ("norm.", "audio_encoder.norm."),
    ("layers.{i}.downsample.", "audio_encoder.layers.{i}.downsample."),
    ("layers.{i}.blocks.{j}.norm1.", "audio_encoder.layers.{i}.blocks.{j}.layernorm_before."),
    ("layers.{i}.blocks.{j}.norm2.", "audio_encoder.layers.{i}.blocks.{j}.layernorm_after."),
    ("layers.{i}.blocks.{j}.attn.relative_position_", "audio_encoder.layers.{i}.blocks.{j}.attention.self.relative_position_"),
    ("layers.{i}.blocks.{j}.attn.proj.", "audio_encoder.layers.{i}.blocks.{j}.attention.output.dense."),
    ("layers.{i}.blocks.{j}.mlp.fc1.", "audio_encoder.layers.{i}.blocks.{j}.intermediate.dense."),
    ("layers.{i}.blocks.{j}.mlp.fc2.", "audio_encoder.layers.{i}.blocks.{j}.output.dense."),
]
_HF_CLAP_QKV = re.compile(r"^audio_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")
# laion-only tensors: the front end (a function of the config) and the AudioSet classifier
HTSAT_NOT_IN_HF = ("spectrogram_extractor.", "logmel_extractor.", "tscam_conv.", "head.")


def _pattern(fmt: str) -> re.Pattern:
    body = re.escape(fmt).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + body + ("" if fmt.endswith((".", "_")) else "$"))


def rename(name: str, rules, unknown: str, reverse: bool = False) -> str:
    """`name` under the first matching rule (open_clip/laion -> HF, or back with `reverse`); a name
    no rule matches is a KeyError saying `unknown` (a format string of `name`)."""
    for a, b in rules:
        src, dst = (b, a) if reverse else (a, b)
        m = _pattern(src).match(name)
        if m:
            return dst.format(**m.groupdict()) + name[m.end():]
    raise KeyError(unknown.format(name=name))


# ---- HF CLIP -> open_clip ------------------------------------------------------------------------
def hf_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision (or full CLIPModel) state dict -> open_clip visual state dict."""
    out, qkv = {}, {}
    for name, t in sd.items():
        if name.startswith(("text_model.", "text_projection", "logit_scale")) or name.endswith("position_ids"):
            continue
        m = _HF_CLIP_QKV.match(name)
        if m:
            layer, part, kind = m.groups()
            qkv.setdefault((layer, kind), {})[part] = t
        elif name == "visual_projection.weight":
            out["proj"] = t.t()
        else:
            out[rename(name, CLIP_RENAMES, "HF CLIP tensor {name!r} has no open_clip counterpart", reverse=True)] = t
    for (layer, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise KeyError(f"HF CLIP layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# what transformers 5 writes for a CLIPVisionModel: its vision_model's keys without the prefix
_HF_CLIP_BARE = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")


def open_clip_visual(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported vision checkpoint -> open_clip visual keys: a full open_clip CLIP (`visual.*`),
    a bare visual tower, or HF CLIP (`vision_model.*`, or unprefixed from a CLIPVisionModel)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith(_HF_CLIP_BARE) for k in sd):
        sd = {f"vision_model.{k}" if k.startswith(_HF_CLIP_BARE) else k: v for k, v in sd.items()}
    if any(k.startswith("vision_model.") for k in sd):
        return hf_to_open_clip(sd)
    return {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")} or sd


# ---- HF CLAP -> laion HTSAT ----------------------------------------------------------------------
def hf_to_laion(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `ClapAudioModel` (or `ClapModel`) state dict -> laion HTSAT state dict (no front end, no head)."""
    out, qkv = {}, {}
    for name, t in sd.items():
        name = name.removeprefix("audio_model.")
        if not name.startswith("audio_encoder."):
            continue  # text tower, projections, logit scales of a full ClapModel
        m = _HF_CLAP_QKV.match(name)
        if m:
            stage, block, part, kind = m.groups()
            qkv.setdefault((stage, block, kind), {})[part] = t
            continue
        out[rename(name, CLAP_RENAMES, "HF CLAP tensor {name!r} has no laion HTSAT counterpart", reverse=True)] = t
    for (stage, block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"HF CLAP stage {stage} block {block}: {kind} of query/key/value incomplete ({sorted(parts)})")
        out[f"layers.{stage}.blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def is_hf_clap(sd: dict[str, torch.Tensor]) -> bool:
    """Hugging Face CLAP names (`audio_encoder.*`), which lack laion's log-mel front end and head."""
    return any(k.removeprefix("module.").removeprefix("audio_model.").startswith("audio_encoder.") for k in sd)


def laion_htsat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported audio checkpoint -> laion HTSAT keys: a laion_clap checkpoint
    (`module.audio_branch.*`), a bare HTSAT state dict, or HF CLAP (`audio_encoder.*`)."""
    if is_hf_clap(sd):
        return hf_to_laion({k.removeprefix("module."): v for k, v in sd.items()})
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k[len("audio_branch.") :]: v for k, v in sd.items() if k.startswith("audio_branch.")} or sd


# ---- HF Whisper (encoder) ---------------------------------------------------------------------------
# The training encoder *is* transformers' `WhisperEncoder`, so its state dict is already the public
# layout; checkpoints differ only by where the encoder sits: `WhisperEncoder` (bare names, what
# export-hf writes), `WhisperModel` / `WhisperForAudioClassification` (`encoder.*`),
# `WhisperForConditionalGeneration` (`model.encoder.*`). Decoders and heads are dropped.
_WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")
_WHISPER_BARE = ("conv1.", "conv2.", "embed_positions.", "layers.", "layer_norm.")


def whisper_encoder_weights(sd: dict[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Any Hugging Face Whisper state dict -> `WhisperEncoder` names (module docstring above)."""
    if any(k.startswith(("encoder.blocks.", "encoder.positional_embedding")) for k in sd):
        raise ValueError(
            f"{where} is an openai-whisper checkpoint (encoder.blocks.*); convert it to the Hugging Face layout first "
            f"(transformers' models/whisper/convert_openai_to_hf.py) and give the folder it writes")
    for prefix in _WHISPER_ENCODER_PREFIXES:
        out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):].startswith(_WHISPER_BARE)}
        if out:
            return out
    raise ValueError(f"{where} holds no Whisper encoder tensors (conv1.*, layers.* under encoder. / model.encoder.); "
                     f"give a Hugging Face Whisper folder (WhisperModel.save_pretrained) or set model.audio.type=htsat")
