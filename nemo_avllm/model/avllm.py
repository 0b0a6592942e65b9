"""The Audio-Visual LLM (paper §3.1): frozen encoders -> linear projectors -> LLaMA decoder.

One instance is one pipeline stage. The first stage owns the encoders and projectors and turns
the token stream into input embeddings: every placeholder position (see `nemo_avllm.modality`)
is overwritten by the projected encoder output of its kind, in order. Only the samples whose
tokens ask for a modality are sent through its encoder ("selective activation", paper §3.3).
Later stages are plain `GPTModel` stages fed by megatron's pipeline schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from nemo_avllm import modality
from nemo_avllm.model.encoders import AudioEncoderConfig, VisionEncoder, VisionEncoderConfig, WhisperEncoderConfig, build_audio_encoder
from nemo_avllm.model.llm import LLMConfig, build_gpt
from nemo_avllm.model.projector import Projector


@dataclass
class AVLLMConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    audio: AudioEncoderConfig | WhisperEncoderConfig = field(default_factory=AudioEncoderConfig)  # by model.audio.type
    num_frames: int = 32  # T
    num_audio_segments: int = 4  # K
    transformer_impl: str = "local"  # local | transformer_engine (resolved from `auto` by the provider)
    # False when training reads cached encoder outputs: the encoders are then never built.
    build_encoders: bool = True
    encoder_dtype: torch.dtype = torch.float32  # frozen encoders' own dtype (model.encoder_dtype)

    def layout(self) -> modality.TokenLayout:
        """Embedding positions per modality token, from the configs alone (no weights needed)."""
        return modality.TokenLayout(self.num_frames, self.vision.geometry()["num_patches"], self.num_audio_segments)


@dataclass
class EncoderFeatures:
    """Frozen-encoder outputs for the samples of a batch that need them (None = not needed).

    temporal [B, T, Dv], spatial [B, N, Dv], audio [B, K, Da]; rows of samples that do not use a
    modality are ignored."""

    temporal: torch.Tensor | None = None
    spatial: torch.Tensor | None = None
    audio: torch.Tensor | None = None


class AVLLM(MegatronModule):
    def __init__(self, cfg: AVLLMConfig, config, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        self.cfg = cfg
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads (untied, LLaMA)
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision = self.audio = None
        vision_width, audio_width = cfg.vision.geometry()["width"], cfg.audio.width
        self.layout = cfg.layout()
        if pre_process and cfg.build_encoders:
            self.vision = VisionEncoder(cfg.vision).set_dtype(cfg.encoder_dtype)
            self.audio = build_audio_encoder(cfg.audio).set_dtype(cfg.encoder_dtype)
        if pre_process:
            h = cfg.llm.hidden_size
            self.proj_temporal = Projector(vision_width, h, config)
            self.proj_spatial = Projector(vision_width, h, config)
            self.proj_audio = Projector(audio_width, h, config)
        self.llm = build_gpt(cfg.llm, config, cfg.transformer_impl, pre_process, post_process)

    # --- pipeline plumbing -------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.llm.shared_embedding_or_output_weight()

    def standardize_projector_inputs(self, stats: dict) -> list[str]:
        """`stats`: {"temporal"|"spatial"|"audio": (mean [D], std [D])} of the encoder outputs
        (`FeatureCache.stats`) -> folded into the matching projector. Returns the kinds done."""
        projectors = {"temporal": self.proj_temporal, "spatial": self.proj_spatial, "audio": self.proj_audio}
        for kind, (mean, std) in stats.items():
            projectors[kind].standardize_inputs(mean, std)
        return sorted(stats)

    # --- encoders ----------------------------------------------------------------------------
    def encode(
        self, input_ids: torch.Tensor, video: torch.Tensor | None, audio: torch.Tensor | None
    ) -> EncoderFeatures:
        """Run each frozen encoder only on the samples whose tokens need it. With tensor
        parallelism the encoders (replicated, frozen) run on TP rank 0 alone and their outputs are
        broadcast to the group, so the other ranks need no media at all."""
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
            feats = self._encode(input_ids, video, audio) if ps.get_tensor_model_parallel_rank() == 0 else None
            return self._broadcast_features(input_ids, feats)
        return self._encode(input_ids, video, audio)

    def _broadcast_features(self, input_ids: torch.Tensor, feats: EncoderFeatures | None) -> EncoderFeatures:
        """TP rank 0's encoder outputs on every TP rank; shapes follow from the tokens and configs."""
        from megatron.core import parallel_state as ps

        b, lay = input_ids.shape[0], self.layout
        dv, da = self.cfg.vision.geometry()["width"], self.cfg.audio.width
        dtype = next(self.vision.parameters()).dtype if self.vision is not None else self.config.params_dtype
        shapes = {"temporal": (b, lay.num_frames, dv), "spatial": (b, lay.num_patches, dv), "audio": (b, lay.num_audio_segments, da)}
        wanted = {"temporal": modality.needs_visual(input_ids).any(), "spatial": modality.needs_visual(input_ids).any(),
                  "audio": modality.needs_audio(input_ids).any()}
        out = EncoderFeatures()
        for kind, shape in shapes.items():
            if not wanted[kind]:
                continue
            t = getattr(feats, kind).to(dtype).contiguous() if feats is not None else torch.empty(
                shape, dtype=dtype, device=input_ids.device)
            torch.distributed.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(),
                                        group=ps.get_tensor_model_parallel_group())
            setattr(out, kind, t)
        return out

    def _encode(
        self, input_ids: torch.Tensor, video: torch.Tensor | None, audio: torch.Tensor | None
    ) -> EncoderFeatures:
        feats = EncoderFeatures()
        want_v = modality.needs_visual(input_ids)
        want_a = modality.needs_audio(input_ids)
        if want_v.any():
            if video is None or self.vision is None:
                raise ValueError("batch has visual placeholder tokens but no video (or no vision encoder)")
            idx = want_v.nonzero().squeeze(1)
            e_t, e_s = self.vision(video.index_select(0, idx.to(video.device)))
            feats.temporal = _scatter_rows(e_t, idx, input_ids.shape[0])
            feats.spatial = _scatter_rows(e_s, idx, input_ids.shape[0])
        if want_a.any():
            if audio is None or self.audio is None:
                raise ValueError("batch has audio placeholder tokens but no audio (or no audio encoder)")
            idx = want_a.nonzero().squeeze(1)
            e_a = self.audio(audio.index_select(0, idx.to(audio.device)))
            feats.audio = _scatter_rows(e_a, idx, input_ids.shape[0])
        return feats

    # --- embeddings --------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, feats: EncoderFeatures) -> torch.Tensor:
        """Token embeddings with every placeholder position replaced by projected features.
        Returns megatron's [s, b, h] layout."""
        text = self.llm.embedding(input_ids=input_ids.clamp(min=0), position_ids=position_ids)  # [s, b, h]
        emb = text.transpose(0, 1)  # [b, s, h]
        kinds = (
            (modality.TEMPORAL_ID, feats.temporal, self.proj_temporal, self.layout.num_frames),
            (modality.SPATIAL_ID, feats.spatial, self.proj_spatial, self.layout.num_patches),
            (modality.AUDIO_ID, feats.audio, self.proj_audio, self.layout.num_audio_segments),
        )
        projected = {}
        unused = None
        for pid, feat, proj, length in kinds:
            mask = input_ids == pid
            if not mask.any():
                # Applied all the same, contributing exactly zero: every trainable parameter takes
                # part in every micro-batch's backward (a zero gradient). megatron's DDP with
                # overlapped grad reduce launches a bucket's reduce when the parameters that got
                # gradients in the first step's last micro-batch are ready again, and asserts when
                # a modality missing from a micro-batch left its projector without one.
                zero = proj(emb.new_zeros(1, 1, proj.in_features)).sum() * 0
                unused = zero if unused is None else unused + zero
                continue
            if feat is None:
                raise ValueError(f"batch has placeholder id {pid} but no features for it")
            counts = mask.sum(dim=1)
            if bool((counts % length).any()):
                bad = int((counts % length != 0).nonzero()[0, 0])
                raise ValueError(
                    f"sample {bad} has {int(counts[bad])} positions of placeholder {pid}, not a multiple of "
                    f"{length}: the data was expanded for another T/N/K than the model's {self.layout}"
                )
            if feat.shape[1] != length:
                raise ValueError(f"features for placeholder {pid} have {feat.shape[1]} rows; the model expects {length}")
            projected[pid] = proj(feat)  # [b, length, hidden]
        emb = modality.splice(emb, input_ids, projected)
        if unused is not None:
            emb = emb + unused.to(emb.dtype)
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        features: EncoderFeatures | None = None,
        runtime_gather_output: bool | None = None,
        packed=None,
    ) -> torch.Tensor:
        """Per-token loss [b, s] when `labels` are given (last stage), else logits / hidden states.

        `features` (cached encoder outputs) replaces running the encoders on `video`/`audio`.
        Later pipeline stages need no `input_ids` (their input is the previous stage's output).
        `packed` (`data.packing.PackedRows`): `input_ids`/media are per sample, `labels` and the
        result are the packed rows [R, S]; see `_forward_packed`."""
        if packed is not None:
            return self._forward_packed(packed, input_ids, labels, video, audio, features, runtime_gather_output)
        if position_ids is None and input_ids is not None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        decoder_input = None
        if self.pre_process:
            feats = features if features is not None else self.encode(input_ids, video, audio)
            decoder_input = self.embed(input_ids, position_ids, feats)
        if labels is not None:
            # positions without loss get a valid id; the loss mask removes them (Eq. 6)
            labels = labels.clamp(min=0)
        return self.llm(
            input_ids=input_ids.clamp(min=0) if input_ids is not None else None,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            runtime_gather_output=runtime_gather_output,
        )

    def _forward_packed(self, packed, input_ids, labels, video, audio, features, runtime_gather_output):
        """Packed rows: encoders and embedding run per sample (exactly as unpacked), the
        embeddings are gathered into rows, and attention stays inside each sample: megatron's
        THD `PackedSeqParams` with Transformer Engine (rows flattened to one [R*S, 1] sequence,
        RoPE restarting per `cu_seqlens` segment), a block-diagonal causal mask and per-sample
        RoPE positions with the local spec."""
        from megatron.core import tensor_parallel

        thd = self.cfg.transformer_impl == "transformer_engine"
        if not thd and self.config.masked_softmax_fusion:
            raise ValueError("packed sequences with the local layer spec need model fusions off for the masked "
                             "softmax (its fused causal kernel ignores the block mask); use Transformer Engine")
        R, S = packed.rows, packed.length
        decoder_input = None
        if self.pre_process:
            feats = features if features is not None else self.encode(input_ids, video, audio)
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
            emb = self.embed(input_ids, pos, feats)  # [L, n, h]
            sp = self.config.sequence_parallel
            if sp:  # embed scattered the per-sample layout; rows are scattered instead
                emb = tensor_parallel.gather_from_sequence_parallel_region(emb, tensor_parallel_output_grad=False)
            decoder_input = packed.pack(emb)  # [S, R, h]
            if thd:
                decoder_input = decoder_input.transpose(0, 1).reshape(R * S, 1, -1)
            if sp:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        if labels is not None:
            labels = labels.clamp(min=0)
            if thd:
                labels = labels.reshape(1, R * S)
        if thd:
            out = self.llm(input_ids=None, position_ids=None, attention_mask=None, decoder_input=decoder_input,
                           labels=labels, packed_seq_params=packed.packed_seq_params(),
                           runtime_gather_output=runtime_gather_output)
            return out.reshape(R, S) if labels is not None else out
        positions = packed.position_ids()
        return self.llm(input_ids=None, position_ids=positions, attention_mask=packed.attention_mask(),
                        decoder_input=decoder_input, labels=labels, runtime_gather_output=runtime_gather_output,
                        rope_position_ids=positions)


def _scatter_rows(rows: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
    """[n, ...] features of the selected samples -> [batch, ...] with zeros elsewhere."""
    out = rows.new_zeros((batch, *rows.shape[1:]))
    out[idx.to(rows.device)] = rows
    return out
