"""Training data of one stage: the run's `DataSpec`, validated samples, and the loaders per DP rank.

This is where the configuration meets the data code: `data_spec` reads the typed model config,
`cfg.model.data` and the trainer once and hands the data code a frozen `DataSpec` (the data code
never reads the model config). `TrainData` validates `model.data.train_manifest` (or opens
`model.data.shards`, which `avllm prepare shards.out_dir=` validated when it wrote them) and, with
`model.data.validation_manifest`, the validation samples (every sample once).

Manifest checks run once, before the trainer starts (bad samples are reported, never fatal). The
loader is built lazily from the consumed-samples count, so a resumed run continues with exactly
the samples the interrupted one would have seen next."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from omegaconf import DictConfig

from nemo_avllm.data.decode import DecodeSettings
from nemo_avllm.data.features import DEFAULT_AUDIO_ENCODER
from nemo_avllm.data.mat_sampler import DEFAULT_SCHEDULE, DEFAULT_SPLIT
from nemo_avllm.data.spec import DataSpec
from nemo_avllm.data.tokenizer import load_tokenizer
from nemo_avllm.errors import UserError
from nemo_avllm.media import resolve_backend

log = logging.getLogger(__name__)


def decode_settings(model, backend: str = "cpu") -> DecodeSettings:
    """What the data decodes for the typed model config `model` (`AVLLMConfig`): T frames of the
    vision encoder's image size, K windows of the audio encoder's rate and length. `backend` is
    resolved here, once per run, so every worker agrees."""
    return DecodeSettings(
        num_frames=model.num_frames,
        num_audio_segments=model.num_audio_segments,
        image_size=model.vision.geometry()["image_size"],
        sample_rate=model.audio.sample_rate,
        window=model.audio.clip_samples,
        backend=resolve_backend(backend),
    )


def _portable(enc: dict) -> dict:
    """Encoder config for hashing: a checkpoint counts by file name, not by where it lies."""
    d = json.loads(json.dumps(enc))  # tuples -> lists, as they come back from meta.json
    if d.get("checkpoint"):
        d["checkpoint"] = os.path.basename(str(d["checkpoint"]))
    return d


def cache_fields(cfg) -> dict:
    """Everything the cached tokens depend on, from the typed model config (`AVLLMConfig`: its
    encoder configs, T and K; no model is built)."""
    geo = cfg.vision.geometry()
    audio = _portable({k: v for k, v in dataclasses.asdict(cfg.audio).items() if k != "type"})
    fields = {
        "num_frames": cfg.num_frames,
        "num_audio_segments": cfg.num_audio_segments,
        "image_size": geo["image_size"],
        "num_patches": geo["num_patches"],
        "feature_layer": cfg.vision.feature_layer,
        "sample_rate": cfg.audio.sample_rate,
        "window": cfg.audio.clip_samples,
        "vision_width": geo["width"],
        "audio_width": cfg.audio.width,
        "vision": _portable(dataclasses.asdict(cfg.vision)),
        "audio": audio,
    }
    if cfg.audio.type != DEFAULT_AUDIO_ENCODER:  # whisper: its caches and HTSAT's are never mixed
        fields["audio_encoder"] = cfg.audio.type
    return fields


def data_spec(cfg: DictConfig, model=None, **run) -> DataSpec:
    """The run's `DataSpec` from `cfg.model` (typed: `model`, built from it when not given),
    `cfg.model.data` and `cfg.trainer`; `run`: the fields only the run knows (dp_rank, dp_size,
    max_steps). Defaults of unset keys are the conf files' and `mat_sampler`'s."""
    from nemo_avllm.model.provider import avllm_config

    m, d = cfg.model, cfg.model.data
    model = model if model is not None else avllm_config(m)
    spec = DataSpec(
        layout=model.layout(),
        decode=decode_settings(model, d.get("decode_backend", "auto")),
        global_batch_size=int(m.global_batch_size),
        micro_batch_size=int(m.micro_batch_size),
        seq_length=int(m.seq_length),
        mat_ratios=dict(d.mat_ratios) if d.get("mat_ratios") else None,
        schedule=d.get("modality_schedule", DEFAULT_SCHEDULE),
        schedule_split=float(d.get("modality_schedule_split", DEFAULT_SPLIT)),
        max_steps=int(cfg.trainer.get("max_steps", -1)),
        seed=int(cfg.trainer.get("seed", 1234)),
        num_workers=int(d.get("num_workers", 2)),
        index=d.get("index"),
        feature_cache=d.get("feature_cache") or None,
        feature_fields=cache_fields(model),
        max_length_policy=d.get("max_length_policy", "truncate"),
        derive_views=bool(d.get("derive_views", False)),
        packing=bool(d.get("packing", False)),
        # packed layout: fixed micro-batch shapes with pipeline parallelism, TE's THD with TE layers
        fixed_shape=int(m.get("pipeline_model_parallel_size", 1)) > 1,
        thd=model.transformer_impl == "transformer_engine",
    )
    return dataclasses.replace(spec, **run)


def model_spec(model_cfg, backend: str = "cpu", **fields) -> DataSpec:
    """A `DataSpec` for a model config alone (tests, benchmarks, tools without a trainer): its
    layout, decode settings and feature-cache fields; the batch geometry and the rest from `fields`."""
    from nemo_avllm.model.provider import avllm_config

    model = avllm_config(model_cfg)
    return DataSpec(layout=model.layout(), decode=decode_settings(model, backend), feature_fields=cache_fields(model),
                    **fields)


class TrainData:
    def __init__(self, cfg: DictConfig):
        from nemo_avllm.data.manifest_checks import validate_manifest

        m, d = cfg.model, cfg.model.data
        if bool(d.get("train_manifest")) == bool(d.get("shards")):
            raise UserError("set one of model.data.train_manifest (a JSON Lines manifest) and model.data.shards "
                            "(the folder or URL `avllm prepare shards.out_dir=` wrote) to train on"
                            + (", not both" if d.get("shards") else ""))
        if not m.get("tokenizer"):
            raise UserError("model.tokenizer is not set: give the LLM's Hugging Face tokenizer folder")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(m.tokenizer)
        vocab = int(m.llm.vocab_size)
        if len(self.tokenizer) > vocab:
            raise UserError(f"model.tokenizer={m.tokenizer} has {len(self.tokenizer)} tokens, more than model.llm.vocab_size={vocab}")
        self.spec = data_spec(cfg)

        def checked(path: str, key: str):
            samples, report = validate_manifest(
                path,
                index=self.spec.index,
                tokenizer=self.tokenizer,
                layout=self.spec.layout,
                max_length=self.spec.seq_length,
                policy=self.spec.max_length_policy,
                check_files=not self.spec.feature_cache,  # with a feature cache the media need not be here
            )
            log.info("%s", report)
            if not samples:
                raise UserError(f"{key}={path}: no usable sample ({str(report).splitlines()[0]}); "
                                f"fix the problems logged above")
            return samples, report

        self.shards = None
        if d.get("shards"):
            from nemo_avllm.data.shards import open_shards

            try:
                self.shards = open_shards(str(d.shards))[1]
            except FileNotFoundError as e:
                raise UserError(f"model.data.shards: {e}") from e
            self.samples = []
        else:
            self.samples, self.report = checked(d.train_manifest, "model.data.train_manifest")
        self.val_samples = []
        if d.get("validation_manifest"):
            self.val_samples, self.val_report = checked(d.validation_manifest, "model.data.validation_manifest")

    @property
    def num_samples(self) -> int:
        return int(self.shards["total"]) if self.shards is not None else len(self.samples)

    @property
    def reads_features(self) -> bool:
        """The shards hold cached encoder tokens (no encoders needed)."""
        return self.shards is not None and self.shards.get("content") == "features"

    def rank_spec(self, max_steps: int | None = None) -> DataSpec:
        """The spec with this data-parallel rank and the run's step count (trainer.max_steps, or
        what max_epochs gives when it is -1, as `training.train` computes it)."""
        from megatron.core import parallel_state as ps

        run = {"dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size()}
        return dataclasses.replace(self.spec, **run, **({"max_steps": max_steps} if max_steps else {}))

    def loader(self, model, consumed_samples: int, max_steps: int | None = None):
        """An endless iterable of this rank's micro-batches, starting after `consumed_samples`.
        Ranks that receive their data by broadcast (see `training.broadcast`) read nothing."""
        from nemo_avllm.data.loaders import train_loader
        from nemo_avllm.training.broadcast import reads_data

        if not reads_data(self.spec.packing):
            return _Epochs([None])
        source = str(self.cfg.model.data.shards) if self.shards is not None else self.samples
        return _Epochs(train_loader(self.rank_spec(max_steps), source, self.tokenizer, consumed_samples))

    def val_loader(self, model):
        """This rank's validation micro-batches (same dataset, collate and feature cache)."""
        from nemo_avllm.data.loaders import eval_loader

        return eval_loader(self.rank_spec(), self.val_samples, self.tokenizer)


class _Epochs:
    """Cycles the loader's epochs: Lightning sees one endless epoch, `max_steps` ends training."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        while True:
            yield from self.loader
