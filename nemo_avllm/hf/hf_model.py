"""The Audio-Visual LLM as a Hugging Face model: what `avllm export-hf` folders load into.

Folder layout (written by `nemo_avllm.hf.export_hf`, and by `save_pretrained`):

    config.json               AVLLMConfig: sub-configs, T, N, K, token ids, preprocessing
    generation_config.json
    projectors.safetensors    proj_{temporal,spatial,audio}.{weight,bias}
    tokenizer files           the LLM's tokenizer + <VIS>, <AUD>, <AUD_VIS> as special tokens
    llm/                      a plain `LlamaForCausalLM` folder (config, model.safetensors, tokenizer)
    vision/                   a plain `CLIPVisionModelWithProjection` folder
    audio/                    a plain `ClapAudioModel` folder (HTSAT), or a `WhisperEncoder` folder
                              (model.audio.type=whisper; transformers.models.whisper.modeling_whisper)

Each component folder loads alone with plain `transformers`; nothing is stored twice. Loading the
whole model needs `transformers` and this package (no `trust_remote_code`, no pickle): importing
`nemo_avllm` registers `AVLLMConfig` / `AVLLMForConditionalGeneration` with the Auto classes.

Token layout, as in training (`nemo_avllm.modality`): a modality token in the text becomes T + N
(`<VIS>`), K (`<AUD>`) or T + N + K (`<AUD_VIS>`) embedding positions. In the HF model's ids those
positions are runs of the `<VIS>` id (T temporal then N spatial positions) and of the `<AUD>` id
(K positions); `expand_modality_tokens` turns single tokens into such runs (the model and
`generate` do it themselves), so its logits are position for position the training model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    ClapAudioModel,
    CLIPVisionModelWithProjection,
    GenerationConfig,
    GenerationMixin,
    LlamaForCausalLM,
    PreTrainedModel,
)

from nemo_avllm import modality
from nemo_avllm.hf.hf_config import AVLLMConfig

LLM_DIR, VISION_DIR, AUDIO_DIR = "llm", "vision", "audio"
PROJECTORS_FILE = "projectors.safetensors"
PROJECTORS = ("proj_temporal", "proj_spatial", "proj_audio")


def is_whisper(config: AVLLMConfig) -> bool:
    """Whether the audio tower is a Whisper encoder (else CLAP HTSAT)."""
    return getattr(config.audio_config, "model_type", None) == "whisper"


def _audio_tower_class(config: AVLLMConfig):
    if is_whisper(config):
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder
    return ClapAudioModel
# from_pretrained arguments handed on to the component models
_COMPONENT_KWARGS = ("dtype", "torch_dtype", "device_map", "attn_implementation", "low_cpu_mem_usage")


# ------------------------------------------------------------------------------------------------
# token ids: HF runs of modality ids <-> training placeholder ids
# ------------------------------------------------------------------------------------------------
def _hf_id(config: AVLLMConfig, placeholder: int) -> int:
    return config.aud_token_id if placeholder == modality.AUDIO_ID else config.vis_token_id


def from_placeholder_ids(ids: list[int], config: AVLLMConfig) -> list[int]:
    """Training ids (negative placeholders, `nemo_avllm.data.conversation`) -> HF model ids."""
    return [_hf_id(config, i) if i in modality.PLACEHOLDER_IDS else i for i in ids]


def placeholder_ids(input_ids: torch.Tensor, config: AVLLMConfig) -> torch.Tensor:
    """Expanded HF ids -> training ids: in every run of T + N `<VIS>` ids the first T positions are
    temporal and the next N spatial; every `<AUD>` position is an audio segment."""
    lay = config.layout()
    vis = input_ids == config.vis_token_id
    aud = input_ids == config.aud_token_id
    for mask, length, token in ((vis, lay.length(modality.VIS_TOKEN), modality.VIS_TOKEN),
                                (aud, lay.length(modality.AUD_TOKEN), modality.AUD_TOKEN)):
        bad = (mask.sum(dim=1) % length).nonzero()
        if len(bad):
            raise ValueError(
                f"sample {int(bad[0, 0])} has {int(mask[bad[0, 0]].sum())} {token} positions, not a multiple of "
                f"{length}: expand the ids first (AVLLMForConditionalGeneration.expand_modality_tokens)"
            )
    offset = (vis.long().cumsum(dim=1) - 1) % lay.length(modality.VIS_TOKEN)
    ph = torch.where(offset < lay.num_frames, modality.TEMPORAL_ID, modality.SPATIAL_ID)
    out = torch.where(vis, ph, input_ids)
    return torch.where(aud, torch.full_like(input_ids, modality.AUDIO_ID), out)


def _expand_row(row: list[int], config: AVLLMConfig) -> list[tuple[int, int]]:
    """(new id, source position) for one row; runs already expanded are kept as they are."""
    lay = config.layout()
    runs = {config.vis_token_id: modality.VIS_TOKEN, config.aud_token_id: modality.AUD_TOKEN}
    out, i = [], 0
    while i < len(row):
        tok, j = row[i], i
        while j < len(row) and row[j] == tok:
            j += 1
        n = j - i
        if tok == config.aud_vis_token_id or (tok in runs and n % lay.length(runs[tok]) != 0):
            name = modality.AUD_VIS_TOKEN if tok == config.aud_vis_token_id else runs[tok]
            if tok in runs and n > lay.length(name):
                raise ValueError(
                    f"a run of {n} {name} ids is neither single tokens nor whole expansions of {lay.length(name)}; "
                    f"separate the modality tokens or expand them yourself"
                )
            expansion = [_hf_id(config, p) for p in lay.expansion(name)]
            out += [(e, k) for k in range(i, j) for e in expansion]
        else:
            out += [(tok, k) for k in range(i, j)]
        i = j
    return out


@dataclass
class Expanded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None


def expand_modality_tokens(input_ids, config: AVLLMConfig, attention_mask=None, labels=None) -> Expanded:
    """Single modality tokens -> the runs of ids the model fills with features (idempotent).
    Rows that grow differently are re-padded on the side the input was padded on (left if any
    row starts with a masked position); labels of modality positions become IGNORE_INDEX."""
    modality_ids = list(config.modality_token_ids.values())
    if not torch.isin(input_ids, torch.tensor(modality_ids, device=input_ids.device)).any():
        return Expanded(input_ids, attention_mask, labels)
    rows = [_expand_row(r, config) for r in input_ids.tolist()]
    if all(len(r) == input_ids.shape[1] for r in rows) and all(
        [t for t, _ in r] == old for r, old in zip(rows, input_ids.tolist())
    ):
        rows = None  # already expanded
    if rows is None:
        new_ids = input_ids
        src = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        width = max(len(r) for r in rows)
        left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
        new_ids = input_ids.new_zeros(len(rows), width)
        src = input_ids.new_zeros(len(rows), width)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=input_ids.device)
        for b, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            new_ids[b, sl] = torch.tensor([t for t, _ in r], device=input_ids.device)
            src[b, sl] = torch.tensor([k for _, k in r], device=input_ids.device)
            valid[b, sl] = True
    if attention_mask is not None:
        mask = torch.where(valid, torch.gather(attention_mask, 1, src), torch.zeros_like(new_ids))
    else:  # new padding needs a mask
        mask = None if bool(valid.all()) else valid.long()
    if labels is not None:
        is_mod = torch.isin(new_ids, torch.tensor(modality_ids, device=new_ids.device))
        labels = torch.where(valid & ~is_mod, torch.gather(labels, 1, src), torch.full_like(new_ids, modality.IGNORE_INDEX))
    return Expanded(new_ids, mask, labels)


# ------------------------------------------------------------------------------------------------
# audio front end
# ------------------------------------------------------------------------------------------------
class LogMel(nn.Module):
    """laion HTSAT's front end (torchlibrosa STFT + log-mel: periodic Hann window, centred reflect
    padding, power 2, Slaney mel filters, 10*log10 with amin 1e-10, ref 1, no top_db) with
    `torch.stft`: waveform [n, samples] -> `ClapAudioModel.input_features` [n, 1, frames, mel].
    HF's ClapFeatureExtractor is NumPy-only and defaults to other frequencies."""

    def __init__(self, sample_rate: int, window_size: int, hop_size: int, mel_bins: int, fmin: float, fmax: float):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.window_size, self.hop_size = window_size, hop_size
        mel = mel_filter_bank(num_frequency_bins=window_size // 2 + 1, num_mel_filters=mel_bins, min_frequency=fmin,
                              max_frequency=fmax, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("window", torch.hann_window(window_size, periodic=True), persistent=False)
        self.register_buffer("mel", torch.tensor(mel, dtype=torch.float32), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav.float(), self.window_size, self.hop_size, self.window_size, self.window,
                          center=True, pad_mode="reflect", return_complex=True)
        power = torch.view_as_real(spec).pow(2).sum(-1)  # [n, freq, frames]
        mel = power.transpose(1, 2) @ self.mel
        return (10.0 * torch.log10(mel.clamp(min=1e-10))).unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class AVLLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """LLaMA + CLIP ViT + CLAP HTSAT (or Whisper) + three linear projectors, numerically the training model.

    Inputs: `input_ids` (modality tokens single or expanded), `pixel_values_videos`
    [B, T, 3, H, W] (CLIP-normalised frames), `audio_values` [B, K, clip_samples] (mono waveform
    at `sample_rate`, each segment one CLAP / Whisper window). Encoders run only for the samples whose ids
    ask for them."""

    config_class = AVLLMConfig
    base_model_prefix = "avllm"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: AVLLMConfig, language_model=None, vision_tower=None, audio_tower=None):
        super().__init__(config)
        self.language_model = language_model if language_model is not None else LlamaForCausalLM(config.text_config)
        self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModelWithProjection(config.vision_config)
        self.audio_tower = audio_tower if audio_tower is not None else _audio_tower_class(config)(config.audio_config)
        hidden = config.text_config.hidden_size
        vision_width = config.vision_config.hidden_size
        a = config.audio_config
        if is_whisper(config):
            from nemo_avllm.model.encoders.whisper import WhisperLogMel

            audio_width = a.d_model
            self.audio_frontend = WhisperLogMel(a.num_mel_bins)
        else:
            audio_width = int(a.patch_embeds_hidden_size * 2 ** (len(a.depths) - 1))
            self.audio_frontend = LogMel(config.sample_rate, config.window_size, config.hop_size, config.mel_bins,
                                         config.fmin, config.fmax)
        self.proj_temporal = nn.Linear(vision_width, hidden)
        self.proj_spatial = nn.Linear(vision_width, hidden)
        self.proj_audio = nn.Linear(audio_width, hidden)
        self.post_init()

    def _init_weights(self, module):
        """Projectors as megatron initialises them; components initialise themselves."""
        if any(module is getattr(self, p, None) for p in PROJECTORS):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # --- ids -------------------------------------------------------------------------------------
    def expand_modality_tokens(self, input_ids, attention_mask=None, labels=None) -> Expanded:
        return expand_modality_tokens(input_ids, self.config, attention_mask, labels)

    # --- encoders --------------------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, T, 3, H, W] -> E_t [n, T, D] ([CLS] per frame), E_s [n, N, D] (patches averaged over T)."""
        n, t = video.shape[:2]
        if t != self.config.num_frames:
            raise ValueError(f"video has {t} frames; this model was trained with T={self.config.num_frames}")
        dtype = self.vision_tower.dtype
        out = self.vision_tower(pixel_values=video.flatten(0, 1).to(dtype), output_hidden_states=True)
        hs = out.hidden_states[self.config.vision_feature_layer]  # [n*T, 1+N, D]
        e_t = hs[:, 0].reshape(n, t, -1)
        e_s = hs[:, 1:].reshape(n, t, hs.shape[1] - 1, -1).mean(dim=1)
        return e_t, e_s

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[n, K, clip_samples] -> E_a [n, K, D]: HTSAT's pooled last hidden state per segment, or
        the mean of Whisper's last hidden state (`nemo_avllm.model.encoders.whisper`)."""
        n, k, s = audio.shape
        if s != self.config.clip_samples:
            raise ValueError(f"audio segments have {s} samples; the audio encoder's window is {self.config.clip_samples}")
        mel = self.audio_frontend(audio.reshape(n * k, s)).to(self.audio_tower.dtype)
        if is_whisper(self.config):
            from nemo_avllm.model.encoders.whisper import whisper_pool

            return whisper_pool(self.audio_tower(input_features=mel).last_hidden_state).reshape(n, k, -1)
        return self.audio_tower(input_features=mel).pooler_output.reshape(n, k, -1)

    def embed(self, input_ids: torch.Tensor, pixel_values_videos=None, audio_values=None,
              features: dict | None = None) -> torch.Tensor:
        """Token embeddings with the modality positions replaced by projected encoder outputs.
        `features` (from `media_features`) reuses encoder outputs, e.g. over the turns of a chat."""
        ph = placeholder_ids(input_ids, self.config)
        embeds = self.get_input_embeddings()(ph.clamp(min=0))
        if features is None:
            features = self.media_features(ph, pixel_values_videos, audio_values)
        return modality.splice(embeds, ph, features)

    def media_features(self, ph: torch.Tensor, pixel_values_videos=None, audio_values=None) -> dict:
        """Projected encoder outputs per placeholder id for the samples of `ph` (training ids)
        that ask for them; each encoder runs only on those samples."""
        features = {}
        for want, media, name in ((modality.needs_visual(ph), pixel_values_videos, "pixel_values_videos"),
                                  (modality.needs_audio(ph), audio_values, "audio_values")):
            if not want.any():
                continue
            if media is None:
                raise ValueError(f"input_ids ask for {name.split('_')[0]} features but no {name} were given")
            idx = want.nonzero().squeeze(1)
            rows = media.index_select(0, idx.to(media.device))
            if name == "pixel_values_videos":
                e_t, e_s = self.encode_video(rows)
                features[modality.TEMPORAL_ID] = self._scatter(self.proj_temporal, e_t, idx, len(ph))
                features[modality.SPATIAL_ID] = self._scatter(self.proj_spatial, e_s, idx, len(ph))
            else:
                features[modality.AUDIO_ID] = self._scatter(self.proj_audio, self.encode_audio(rows), idx, len(ph))
        return features

    @staticmethod
    def _scatter(proj: nn.Linear, feats: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
        h = proj(feats.to(proj.weight.dtype))
        out = h.new_zeros((batch, *h.shape[1:]))
        out[idx.to(h.device)] = h
        return out

    # --- forward / generate ----------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values_videos=None, audio_values=None, attention_mask=None,
                position_ids=None, inputs_embeds=None, labels=None, **kwargs):
        """Logits (and loss with `labels`) over the expanded sequence; other arguments (cache,
        use_cache, ...) go to the `LlamaForCausalLM`."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids (or inputs_embeds)")
            exp = self.expand_modality_tokens(input_ids, attention_mask, labels)
            if exp.input_ids.shape != input_ids.shape and position_ids is not None:
                raise ValueError("position_ids were given for unexpanded modality tokens; expand the ids first")
            input_ids, attention_mask, labels = exp.input_ids, exp.attention_mask, exp.labels
            inputs_embeds = self.embed(input_ids, pixel_values_videos, audio_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """`GenerationMixin.generate` on the expanded prompt (returned with the new tokens).
        Modality tokens that fall inside the LLM's vocabulary are never generated."""
        if input_ids is not None:
            exp = self.expand_modality_tokens(input_ids, attention_mask)
            input_ids = exp.input_ids
            attention_mask = exp.attention_mask if exp.attention_mask is not None else torch.ones_like(input_ids)
        in_vocab = [i for i in self.config.modality_token_ids.values() if i < self.config.text_config.vocab_size]
        if in_vocab and "suppress_tokens" not in kwargs:
            kwargs["suppress_tokens"] = in_vocab
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # --- files -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load an export folder: each component with its own `from_pretrained` (dtype,
        device_map, ... are handed on), the projectors from `projectors.safetensors`."""
        from safetensors.torch import load_file

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder written by `avllm export-hf` (download it first)")
        if not isinstance(config, AVLLMConfig):
            config = AVLLMConfig.from_pretrained(folder)
        load = {k: kwargs[k] for k in _COMPONENT_KWARGS if k in kwargs}
        parts = {}
        for key, sub, klass in (("language_model", LLM_DIR, LlamaForCausalLM),
                                ("vision_tower", VISION_DIR, CLIPVisionModelWithProjection),
                                ("audio_tower", AUDIO_DIR, _audio_tower_class(config))):
            if not (folder / sub / "config.json").is_file():
                raise FileNotFoundError(f"{folder / sub} is missing: an AVLLM folder holds llm/, vision/ and audio/")
            parts[key] = klass.from_pretrained(folder / sub, **load)
        config.text_config = parts["language_model"].config
        config.vision_config = parts["vision_tower"].config
        config.audio_config = parts["audio_tower"].config
        model = cls(config, **parts)
        path = folder / PROJECTORS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (the projector weights)")
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        missing = [k for k in missing if k.startswith(PROJECTORS)]
        if missing or unexpected:
            raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
        dtype = model.language_model.dtype
        for p in PROJECTORS:
            getattr(model, p).to(dtype=dtype, device=model.language_model.device)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

    def save_pretrained(self, save_directory, **kwargs):
        """The export-hf folder layout (components via their own `save_pretrained`)."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        self.generation_config.save_pretrained(folder)
        self.language_model.save_pretrained(folder / LLM_DIR, **kwargs)
        self.vision_tower.save_pretrained(folder / VISION_DIR, **kwargs)
        self.audio_tower.save_pretrained(folder / AUDIO_DIR, **kwargs)
        projectors = {f"{p}.{n}": t.detach().contiguous() for p in PROJECTORS for n, t in getattr(self, p).state_dict().items()}
        save_file(projectors, str(folder / PROJECTORS_FILE), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------
def check_tokenizer(tokenizer, config: AVLLMConfig) -> None:
    """The tokenizer must know the modality tokens, as special tokens, with the model's ids."""
    specials = set(tokenizer.all_special_tokens)
    for token, want in config.modality_token_ids.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if token not in specials or got != want:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no special token {token} with id {want} "
                f"(it maps {token} to {got}); use the tokenizer exported with the model: "
                f"AutoTokenizer.from_pretrained(<export folder>)"
            )


def encode_conversation(tokenizer, turns: list[dict], config: AVLLMConfig, add_generation_prompt: bool = True) -> list[int]:
    """Ids of a conversation in the training template (`nemo_avllm.data.conversation`), with
    modality tokens already expanded: what the training model saw, in this model's ids."""
    from nemo_avllm.data.conversation import tokenize_conversation

    check_tokenizer(tokenizer, config)
    sample = tokenize_conversation(turns, tokenizer, config.layout(), add_generation_prompt=add_generation_prompt)
    return from_placeholder_ids(sample.input_ids, config)
