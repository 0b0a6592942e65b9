"""CLAP HTSAT audio encoder (laion_clap's HTSAT: `encoders/htsat/`), frozen.

Each of the K audio segments (48 kHz mono, CLAP's 480 000-sample window, repeat-padded by the
data pipeline) becomes one embedding: HTSAT's pooled last hidden state, before CLAP's projection
(768-d for HTSAT-tiny, 1024-d for HTSAT-base). HTSAT computes its own log-mel front end from the waveform.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from nemo_avllm.model.encoders.frozen import FrozenEncoder, seeded_init
from nemo_avllm.model.encoders.weights import HTSAT_NOT_IN_HF, is_hf_clap, laion_htsat
from nemo_avllm.model.weight_files import read_state_dict

# HTSAT-{tiny,base,large} as laion_clap builds them (clap_module/htsat.py: create_htsat_model).
HTSAT_ARCHS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32)),
    "base": dict(embed_dim=128, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=256, depths=(2, 2, 12, 2), num_heads=(4, 8, 16, 32)),
}


def preset_arch(cfg, presets: dict) -> dict:
    """The size preset `cfg.model_name` of an audio encoder config, with every key the config
    sets (not null) in place of the preset's (tiny test models, custom sizes)."""
    if cfg.model_name not in presets:
        raise ValueError(f"model.audio.model_name={cfg.model_name!r} (type {cfg.type}); expected one of {sorted(presets)}")
    arch = dict(presets[cfg.model_name])
    arch.update({k: getattr(cfg, k) for k in arch if getattr(cfg, k) is not None})
    return arch


@dataclass
class AudioEncoderConfig:
    type: str = "htsat"  # model.audio.type: which audio encoder (htsat | whisper: encoders/whisper.py)
    model_name: str = "tiny"  # HTSAT size: tiny (laion_clap 630k-audioset checkpoints) | base | large
    # Overrides of the HTSAT size (tiny test models): embed_dim, depths, num_heads
    embed_dim: int | None = None
    depths: tuple | None = None
    num_heads: tuple | None = None
    checkpoint: str | None = None  # laion_clap checkpoint (`module.audio_branch.*`) or HF CLAP file/folder
    init_seed: int = 0  # seed of the initial weights (they stay when checkpoint is null)
    sample_rate: int = 48000
    clip_samples: int = 480000
    window_size: int = 1024
    hop_size: int = 480
    mel_bins: int = 64
    fmin: int = 50
    fmax: int = 14000

    def arch(self) -> dict:
        """HTSAT size with overrides applied: embed_dim, depths, num_heads."""
        return preset_arch(self, HTSAT_ARCHS)

    @property
    def width(self) -> int:
        """Size of one segment embedding: HTSAT doubles its width at each of its stages."""
        arch = self.arch()
        return int(arch["embed_dim"] * 2 ** (len(arch["depths"]) - 1))


class AudioEncoder(FrozenEncoder):
    # The log-mel front end (STFT and mel filter bank as fixed weights) stays fp32: a bf16 power
    # spectrum loses the quiet bins; HTSAT proper runs in the encoder's dtype.
    FP32_MODULES = ("htsat.spectrogram_extractor", "htsat.logmel_extractor")

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        arch = cfg.arch()
        from nemo_avllm.model.encoders.htsat.model import HTSAT_Swin_Transformer  # laion_clap's code (numpy<2 free)

        self.cfg = cfg
        # laion_clap's `audio_cfg`: our front-end fields under its names, plus AudioSet's 527 classes
        front_end = ("sample_rate", "window_size", "hop_size", "mel_bins", "fmin", "fmax", "clip_samples", "model_name")
        audio_cfg = SimpleNamespace(**{k: getattr(cfg, k) for k in front_end}, class_num=527, enable_repeat_mode=False)
        with seeded_init(cfg.init_seed):
            self.htsat = HTSAT_Swin_Transformer(
                spec_size=256,
                patch_size=4,
                patch_stride=(4, 4),
                num_classes=527,
                embed_dim=arch["embed_dim"],
                depths=list(arch["depths"]),
                num_heads=list(arch["num_heads"]),
                window_size=8,
                config=audio_cfg,
            )
        self.width = self.htsat.num_features
        assert self.width == cfg.width
        if cfg.checkpoint:
            self.load_checkpoint(cfg.checkpoint)
        self.freeze()
        self.htsat.logmel_extractor.register_forward_hook(self._mel_to_compute_dtype)

    def _mel_to_compute_dtype(self, _module, _inputs, mel: torch.Tensor) -> torch.Tensor:
        """The fp32 log-mel goes on in HTSAT's dtype."""
        return mel.to(self.dtype)

    def load_checkpoint(self, path: str) -> None:
        """laion_clap weights (630k-audioset layout `module.audio_branch.*`, or HTSAT alone) or Hugging
        Face CLAP weights (`ClapAudioModel`/`ClapModel`: a file or a model folder), mapped to laion
        names by `weights.laion_htsat`. HF checkpoints lack laion's log-mel front end
        (a fixed function of this config, kept as built) and its AudioSet head (unused)."""
        raw = read_state_dict(path)
        missing, unexpected = self.htsat.load_state_dict(laion_htsat(raw), strict=False)
        if is_hf_clap(raw):  # HF has no front end / AudioSet head: those stay as built
            missing = [k for k in missing if not k.startswith(HTSAT_NOT_IN_HF)]
        if any(k.startswith(("mel_conv2d.", "fusion_model.")) for k in unexpected):
            raise ValueError(
                f"audio checkpoint {path} is a laion_clap feature-fusion model (*-fusion-best.pt), whose fusion "
                f"branch this encoder does not build; use the non-fusion 630k-audioset-best.pt"
            )
        if missing or unexpected:
            raise ValueError(
                f"audio checkpoint {path} does not match HTSAT-{self.cfg.model_name} (model.audio): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}; "
                f"laion_clap's 630k-audioset checkpoints are HTSAT-tiny (model/audio=htsat_tiny)"
            )

    def public_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in laion_clap's checkpoint layout (`module.audio_branch.*`), which
        `load_checkpoint` reads."""
        return {f"module.audio_branch.{k}": v for k, v in self.htsat.state_dict().items()}

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, K, samples] at 48 kHz -> E_a [B, K, D]."""
        b, k, n = audio.shape
        if n != self.cfg.clip_samples:
            raise ValueError(f"audio segments have {n} samples; HTSAT expects {self.cfg.clip_samples} (CLAP's window)")
        wav = audio.reshape(b * k, n).float()  # the front end is fp32
        out = self.htsat({"waveform": wav}, device=wav.device)
        return out["embedding"].to(self.dtype).view(b, k, -1)
