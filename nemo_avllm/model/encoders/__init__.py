"""Frozen modality encoders: CLIP ViT (vision) and CLAP HTSAT (audio)."""

from nemo_avllm.model.encoders.audio import AudioEncoder, AudioEncoderConfig
from nemo_avllm.model.encoders.vision import VisionEncoder, VisionEncoderConfig

__all__ = ["AudioEncoder", "AudioEncoderConfig", "VisionEncoder", "VisionEncoderConfig"]
