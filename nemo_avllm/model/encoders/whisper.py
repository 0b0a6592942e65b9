"""Whisper audio encoder (paper Table 7: "replacing HTSAT with different versions of Whisper"), frozen.

The encoder is transformers' `WhisperEncoder` (the encoder half of `WhisperModel`), built from a
`WhisperConfig` (sizes below; any size by config) and loaded from a local Hugging Face Whisper
folder or file, never downloaded. Each of the K audio segments (16 kHz mono, repeat-padded by the
data pipeline to Whisper's window: 30 s = 480 000 samples for the public models) becomes:

1. Whisper's log-mel front end (`WhisperLogMel`): a torch re-implementation of
   `WhisperFeatureExtractor` (400-point periodic Hann STFT, hop 160, last frame dropped, power
   spectrum, Slaney mel filters 0-8 kHz, log10 floored at max - 8, then (x + 4) / 4), checked
   equal to transformers' extractor in tests; batched, on the encoder's device, always fp32;
2. the encoder's last hidden state [1500, d_model] (after its final LayerNorm);
3. one token per segment: the **mean over all encoder positions**. Whisper has no [CLS] token,
   and mean pooling of the last hidden state is what transformers' own
   `WhisperForAudioClassification` does to get one vector per clip. Because the data pipeline
   repeat-pads every segment to the full window (the same contract as CLAP's), every position
   holds real signal of the segment, so the mean is not diluted by padded silence.

Widths: tiny 384, base 512, small 768, medium 1024, large 1280.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemo_avllm.model.encoders.audio import preset_arch
from nemo_avllm.model.encoders.frozen import FrozenEncoder, seeded_init
from nemo_avllm.model.encoders.weights import whisper_encoder_weights
from nemo_avllm.model.weight_files import read_state_dict

# Whisper encoder sizes (openai/whisper-*): d_model, encoder_layers, encoder_attention_heads, num_mel_bins.
WHISPER_ARCHS = {
    "tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, num_mel_bins=80),
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, num_mel_bins=80),
    "small": dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, num_mel_bins=80),
    "medium": dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, num_mel_bins=80),
    "large": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, num_mel_bins=128),  # large-v3
}
N_FFT, HOP_LENGTH = 400, 160  # Whisper's STFT (25 ms window, 10 ms hop at 16 kHz)
# Encoder positions per mel frame: conv2 has stride 2, so a window of `clip_samples` gives
# clip_samples / HOP_LENGTH mel frames and half as many encoder positions.
SAMPLES_PER_POSITION = 2 * HOP_LENGTH


@dataclass
class WhisperEncoderConfig:
    type: str = "whisper"  # model.audio.type: which audio encoder (htsat | whisper)
    model_name: str = "tiny"  # Whisper size: tiny | base | small | medium | large
    # Overrides of the size (tiny test models): d_model, encoder_layers, encoder_attention_heads, num_mel_bins
    d_model: int | None = None
    encoder_layers: int | None = None
    encoder_attention_heads: int | None = None
    num_mel_bins: int | None = None
    # Encoder positions of one window (1500 = 30 s for every public Whisper); clip_samples must be
    # max_source_positions * 320 (two mel frames of 160 samples per position).
    max_source_positions: int = 1500
    checkpoint: str | None = None  # HF Whisper folder/file: WhisperModel, WhisperForConditionalGeneration or WhisperEncoder
    init_seed: int = 0  # seed of the initial weights (they stay when checkpoint is null)
    sample_rate: int = 16000
    clip_samples: int = 480000

    def arch(self) -> dict:
        """Whisper size with overrides applied."""
        return preset_arch(self, WHISPER_ARCHS)

    def check(self) -> None:
        """Settings the front end and the encoder cannot run with, refused naming the key."""
        if self.sample_rate != 16000:
            raise ValueError(f"model.audio.sample_rate={self.sample_rate}: Whisper's front end is fixed at 16000 Hz")
        want = self.max_source_positions * SAMPLES_PER_POSITION
        if self.clip_samples != want:
            raise ValueError(
                f"model.audio.clip_samples={self.clip_samples} does not fit max_source_positions="
                f"{self.max_source_positions}: Whisper's window is max_source_positions x {SAMPLES_PER_POSITION} = "
                f"{want} samples ({want / 16000:g} s); set clip_samples={want}")

    @property
    def width(self) -> int:
        """Size of one segment embedding (Whisper's d_model)."""
        return self.arch()["d_model"]

    def hf_config(self):
        """The transformers `WhisperConfig` of this encoder (its decoder sizes mirror the encoder's;
        only the encoder is built)."""
        from transformers import WhisperConfig

        a = self.arch()
        return WhisperConfig(
            d_model=a["d_model"], encoder_layers=a["encoder_layers"], encoder_attention_heads=a["encoder_attention_heads"],
            encoder_ffn_dim=4 * a["d_model"], decoder_layers=a["encoder_layers"],
            decoder_attention_heads=a["encoder_attention_heads"], decoder_ffn_dim=4 * a["d_model"],
            num_mel_bins=a["num_mel_bins"], max_source_positions=self.max_source_positions,
            activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            encoder_layerdrop=0.0, architectures=["WhisperEncoder"],
        )


class WhisperLogMel(nn.Module):
    """`WhisperFeatureExtractor`'s log-mel in torch: waveform [n, samples] at 16 kHz -> input
    features [n, mel, samples / 160] (fp32). Filters and window are fixed functions of `mel_bins`
    (non-persistent buffers: no checkpoint holds them)."""

    def __init__(self, mel_bins: int):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        mel = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=mel_bins, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("mel", torch.tensor(mel, dtype=torch.float32).T.contiguous(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav.float(), N_FFT, HOP_LENGTH, window=self.window.float(), return_complex=True)
        power = spec[..., :-1].abs().pow(2)  # [n, freq, frames]; Whisper drops the last frame
        log_spec = (self.mel.float() @ power).clamp(min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per segment, as the batched extractor does
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


def whisper_pool(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """[n, positions, d] -> [n, d]: the mean over positions (module docstring: why)."""
    return last_hidden_state.mean(dim=1)


class WhisperAudioEncoder(FrozenEncoder):
    """K audio segments -> K tokens of Whisper's width (module docstring)."""

    # The log-mel front end stays fp32 (a bf16 power spectrum loses the quiet bins); the
    # encoder proper runs in the encoder's dtype.
    FP32_MODULES = ("frontend",)

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg.check()
        self.cfg = cfg
        hf_cfg = cfg.hf_config()
        self.frontend = WhisperLogMel(hf_cfg.num_mel_bins)
        with seeded_init(cfg.init_seed):
            self.whisper = WhisperEncoder(hf_cfg)
        self.width = cfg.width
        if cfg.checkpoint:
            self.load_checkpoint(cfg.checkpoint)
        self.freeze()

    def load_checkpoint(self, path: str) -> None:
        """Encoder weights from a Hugging Face Whisper folder or file (`WhisperModel`,
        `WhisperForConditionalGeneration`, or a bare `WhisperEncoder` as `avllm export-hf` writes
        it); the decoder, if any, is dropped. Loads strictly: every encoder tensor must be there
        with this config's shape."""
        sd = whisper_encoder_weights(read_state_dict(path), str(path))
        own = self.whisper.state_dict()
        bad = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and sd[k].shape != v.shape}
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected or bad:
            raise ValueError(
                f"audio checkpoint {path} does not match Whisper-{self.cfg.model_name} (model.audio, {self.cfg.arch()}, "
                f"max_source_positions={self.cfg.max_source_positions}): missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, shapes (file, model) {dict(list(bad.items())[:3])}; pick the model/audio config of "
                f"this checkpoint's size (whisper_tiny, whisper_base, ...)")
        self.whisper.load_state_dict(sd, strict=True)

    def public_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as a Hugging Face `WhisperEncoder` holds them (what `load_checkpoint` and
        export read)."""
        return dict(self.whisper.state_dict())

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, K, samples] at 16 kHz -> E_a [B, K, d_model]."""
        b, k, n = audio.shape
        if n != self.cfg.clip_samples:
            raise ValueError(f"audio segments have {n} samples; this Whisper encoder expects {self.cfg.clip_samples}")
        mel = self.frontend(audio.reshape(b * k, n)).to(self.dtype)
        hidden = self.whisper(input_features=mel).last_hidden_state
        return whisper_pool(hidden).view(b, k, -1)
