"""CLIP ViT vision encoder (open_clip), frozen.

Per frame it returns the [CLS] token and the patch tokens of the residual stream of one block
(the penultimate by default, `feature_layer=-2`, as in LLaVA). Temporal tokens E_t are the T
[CLS] tokens; spatial tokens E_s are the patch tokens averaged over the T frames (paper Eq. 1-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_avllm.model.encoders.frozen import FrozenEncoder, seeded_init
from nemo_avllm.model.encoders.weights import open_clip_visual
from nemo_avllm.model.weight_files import read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionEncoderConfig:
    model_name: str = "ViT-L-14-quickgelu"  # any open_clip model name
    # An open_clip model config ({embed_dim, vision_cfg, quick_gelu}) to use instead of the
    # registered one of `model_name` (tiny test models, custom variants).
    model_config: dict | None = None
    checkpoint: str | None = None  # open_clip state dict (`visual.*`) or HF CLIP file/folder; safetensors or .pt
    feature_layer: int = -2  # block whose output is used; -1 = last
    init_seed: int = 0  # seed of the initial weights (they stay when checkpoint is null)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def open_clip_config(self) -> dict:
        """The open_clip model config ({embed_dim, vision_cfg, quick_gelu}) of this encoder
        (a given `model_config` needs no open_clip: widths without the encoder installed)."""
        if self.model_config:
            return dict(self.model_config)
        import open_clip

        cfg = open_clip.get_model_config(self.model_name)
        if cfg is None:
            raise ValueError(
                f"model.vision.model_name={self.model_name!r} is not an open_clip model; "
                f"choose one of open_clip.list_models() or give model.vision.model_config"
            )
        return cfg

    def geometry(self) -> dict:
        """width, image_size, patch_size, num_patches and layers, without building the model."""
        v = self.open_clip_config()["vision_cfg"]
        image, patch = v.get("image_size", 224), v.get("patch_size", 16)
        return dict(width=v.get("width", 768), image_size=image, patch_size=patch,
                    num_patches=(image // patch) ** 2, layers=v.get("layers", 12))


class VisionEncoder(FrozenEncoder):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.cfg = cfg
        model_cfg = cfg.open_clip_config()
        with seeded_init(cfg.init_seed):
            self.visual = _build_vision_tower(
                model_cfg["embed_dim"], dict(model_cfg["vision_cfg"]), quick_gelu=model_cfg.get("quick_gelu", False)
            )
        geo = cfg.geometry()
        self.width, self.image_size, self.num_patches = geo["width"], geo["image_size"], geo["num_patches"]
        layers = geo["layers"]
        self.layer_index = layers + cfg.feature_layer if cfg.feature_layer < 0 else cfg.feature_layer
        if not 0 <= self.layer_index < layers:
            raise ValueError(f"model.vision.feature_layer={cfg.feature_layer} out of range for a {layers}-block ViT")
        if cfg.checkpoint:
            self.load_checkpoint(cfg.checkpoint)
        self.freeze()

    def load_checkpoint(self, path: str) -> None:
        """open_clip weights (a full CLIP state dict with `visual.*`, or the visual tower alone) or
        Hugging Face CLIP weights (`CLIPVisionModel[WithProjection]`/`CLIPModel`: a file or a model
        folder), mapped to open_clip names by `weights.open_clip_visual`."""
        sd = open_clip_visual(read_state_dict(path))
        missing, unexpected = self.visual.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(("proj", "attn_pool"))]
        if missing or unexpected:
            raise ValueError(
                f"vision checkpoint {path} does not match {self.cfg.model_name}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, T, 3, H, W] (CLIP-normalised) -> E_t [B, T, D], E_s [B, N, D].

        A still image is a 1-frame video: its T frames are equal, so the ViT sees it once and the
        result is repeated (the same tokens as T passes, at 1/T of the compute)."""
        b, t = video.shape[:2]
        still = _still(video)  # [B]: every frame equals the first
        keep = torch.ones(b, t, dtype=torch.bool, device=video.device)
        keep[still, 1:] = False
        frames = video[keep].to(dtype=self.dtype)  # frames actually encoded
        cls, patches = self._encode_frames(frames)
        # back to [B, T, ...]: each frame of a still sample takes its first frame's output
        source = torch.arange(b * t, device=video.device).view(b, t)
        source[still] = source[still, :1]
        position = torch.full((b * t,), -1, dtype=torch.long, device=video.device)
        position[keep.flatten()] = torch.arange(frames.shape[0], device=video.device)
        pick = position[source.flatten()]
        e_t = cls[pick].view(b, t, -1)
        e_s = patches[pick].view(b, t, patches.shape[1], -1).mean(dim=1)
        return e_t, e_s

    def _encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[F, 3, H, W] -> [CLS] [F, D] and patch tokens [F, N, D] of block `layer_index`."""
        out = self.visual.forward_intermediates(
            frames,
            indices=[self.layer_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return out["image_intermediates_prefix"][0][:, 0], out["image_intermediates"][0]


def _still(video: torch.Tensor) -> torch.Tensor:
    """[B] True where all T frames of a sample are identical (an image repeated T times)."""
    if video.shape[1] == 1:
        return torch.ones(video.shape[0], dtype=torch.bool, device=video.device)
    return (video[:, 1:] == video[:, :1]).flatten(1).all(dim=1)
