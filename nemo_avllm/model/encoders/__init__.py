"""Frozen modality encoders: CLIP ViT (vision); CLAP HTSAT (audio, the default) or Whisper
(audio, `model.audio.type: whisper`, paper Table 7)."""

from nemo_avllm.model.encoders.audio import AudioEncoder, AudioEncoderConfig
from nemo_avllm.model.encoders.vision import VisionEncoder, VisionEncoderConfig
from nemo_avllm.model.encoders.whisper import WhisperAudioEncoder, WhisperEncoderConfig

# model.audio.type -> (config, encoder)
AUDIO_ENCODERS = {"htsat": (AudioEncoderConfig, AudioEncoder), "whisper": (WhisperEncoderConfig, WhisperAudioEncoder)}


def audio_config_class(kind: str | None):
    """The config dataclass of `model.audio.type` (null: htsat)."""
    kind = kind or "htsat"
    if kind not in AUDIO_ENCODERS:
        raise ValueError(f"model.audio.type={kind!r}; expected one of {sorted(AUDIO_ENCODERS)}")
    return AUDIO_ENCODERS[kind][0]


def build_audio_encoder(cfg: AudioEncoderConfig | WhisperEncoderConfig):
    """The frozen audio encoder of an audio config (HTSAT or Whisper, by its `type`)."""
    return AUDIO_ENCODERS[cfg.type][1](cfg)


__all__ = ["AUDIO_ENCODERS", "AudioEncoder", "AudioEncoderConfig", "VisionEncoder", "VisionEncoderConfig",
           "WhisperAudioEncoder", "WhisperEncoderConfig", "audio_config_class", "build_audio_encoder"]
