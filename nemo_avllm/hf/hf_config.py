"""`AVLLMConfig`: the Hugging Face config of an exported Audio-Visual LLM (`model_type: avllm`).

Kept apart from the model and free of model imports: transformers may import its Auto modules
while its own model modules are half-imported, and the config is registered at that moment
(`nemo_avllm.hf.auto_register`). The sub-config classes are looked up when first used."""

from __future__ import annotations

from transformers.configuration_utils import PretrainedConfig

from nemo_avllm import modality


class _SubConfigs:
    """`sub_configs` (component name -> config class), resolved on first access."""

    def __get__(self, obj, owner) -> dict:
        from transformers import ClapAudioConfig, CLIPVisionConfig, LlamaConfig

        return {"text_config": LlamaConfig, "vision_config": CLIPVisionConfig, "audio_config": ClapAudioConfig}


def _sub(cls, value):
    return value if isinstance(value, cls) else cls(**(value or {}))


def _audio_sub(value):
    """The audio tower's config: `ClapAudioConfig` (HTSAT) or `WhisperConfig`, by its model_type."""
    from transformers import PretrainedConfig, WhisperConfig

    if isinstance(value, PretrainedConfig):
        return value
    if (value or {}).get("model_type") == "whisper":
        return WhisperConfig(**value)
    return _sub(AVLLMConfig.sub_configs["audio_config"], value)


class AVLLMConfig(PretrainedConfig):
    """Sub-configs of the three components plus what the training config fixes: the token layout
    (T, N, K and the modality token ids) and the preprocessing the encoders expect."""

    model_type = "avllm"
    sub_configs = _SubConfigs()

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        audio_config=None,
        num_frames: int = 32,
        num_patches: int = 256,
        num_audio_segments: int = 4,
        vision_feature_layer: int = -2,  # index into CLIP's hidden_states (LLaVA's convention)
        vis_token_id: int | None = None,
        aud_token_id: int | None = None,
        aud_vis_token_id: int | None = None,
        image_size: int = 224,
        image_mean=(0.48145466, 0.4578275, 0.40821073),  # CLIP's (export writes the training config's)
        image_std=(0.26862954, 0.26130258, 0.27577711),
        sample_rate: int = 48000,
        clip_samples: int = 480000,
        window_size: int = 1024,
        hop_size: int = 480,
        mel_bins: int = 64,
        fmin: float = 50,
        fmax: float = 14000,
        **kwargs,
    ):
        classes = self.sub_configs
        self.text_config = _sub(classes["text_config"], text_config)
        self.vision_config = _sub(classes["vision_config"], vision_config)
        self.audio_config = _audio_sub(audio_config)
        self.num_frames, self.num_patches, self.num_audio_segments = num_frames, num_patches, num_audio_segments
        self.vision_feature_layer = vision_feature_layer
        self.vis_token_id, self.aud_token_id, self.aud_vis_token_id = vis_token_id, aud_token_id, aud_vis_token_id
        self.image_size, self.image_mean, self.image_std = image_size, list(image_mean), list(image_std)
        self.sample_rate, self.clip_samples = sample_rate, clip_samples
        self.window_size, self.hop_size, self.mel_bins, self.fmin, self.fmax = window_size, hop_size, mel_bins, fmin, fmax
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def layout(self) -> modality.TokenLayout:
        return modality.TokenLayout(self.num_frames, self.num_patches, self.num_audio_segments)

    @property
    def modality_token_ids(self) -> dict[str, int]:
        ids = {modality.VIS_TOKEN: self.vis_token_id, modality.AUD_TOKEN: self.aud_token_id,
               modality.AUD_VIS_TOKEN: self.aud_vis_token_id}
        unset = [t for t, i in ids.items() if i is None]
        if unset:
            raise ValueError(f"AVLLMConfig has no token id for {unset}; it was not written by avllm export-hf")
        return ids
