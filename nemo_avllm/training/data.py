"""Training data of one stage: `cfg.model.data` -> validated samples -> MAT loader per DP rank,
and, with `model.data.validation_manifest`, the validation loader (every sample once). With
`model.data.shards` the training samples stream from webdataset shards instead (`avllm prepare
shards.out_dir=` validated them when it wrote them), with the same modality plan.

Manifest checks run once, before the trainer starts (bad samples are reported, never fatal). The
loader is built lazily from the consumed-samples count, so a resumed run continues with exactly
the samples the interrupted one would have seen next."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from nemo_avllm.data.tokenizer import load_tokenizer
from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)


class TrainData:
    def __init__(self, cfg: DictConfig):
        from nemo_avllm.data.dataset import layout_of
        from nemo_avllm.data.manifest import validate_manifest

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

        def checked(path: str, key: str):
            samples, report = validate_manifest(
                path,
                index=d.get("index"),
                tokenizer=self.tokenizer,
                layout=layout_of(m),
                max_length=int(m.seq_length),
                policy=d.get("max_length_policy", "truncate"),
                # with a feature cache the media files need not be on this machine
                check_files=not d.get("feature_cache"),
            )
            log.info("%s: %s", key, report)
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

    def feature_cache(self):
        """The cache of `model.data.feature_cache`, checked against the model config; None without one."""
        from nemo_avllm.data.features import FeatureCache

        path = self.cfg.model.data.get("feature_cache")
        return FeatureCache(path, self.cfg.model) if path else None

    def loader(self, model, consumed_samples: int):
        """An endless iterable of this rank's micro-batches, starting after `consumed_samples`.
        Ranks that receive their data by broadcast (see `training.broadcast`) read nothing."""
        from megatron.core import parallel_state as ps

        from nemo_avllm.data.dataset import build_dataloader
        from nemo_avllm.training.broadcast import reads_data

        m, d = self.cfg.model, self.cfg.model.data
        packing = bool(d.get("packing", False))
        if not reads_data(packing):
            return _Epochs([None])

        kw = dict(
            global_batch_size=int(m.global_batch_size),
            micro_batch_size=int(m.micro_batch_size),
            seq_length=int(m.seq_length),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            ratios=dict(d.mat_ratios) if d.get("mat_ratios") else None,
            derive_views=bool(d.get("derive_views", False)),
            seed=int(self.cfg.trainer.get("seed", 1234)),
            consumed_samples=consumed_samples,
            num_workers=int(d.get("num_workers", 2)),
            backend=d.get("decode_backend", "auto"),
            schedule=d.get("modality_schedule", "mat"),
            schedule_split=float(d.get("modality_schedule_split", 0.5)),
            # the run's step count (trainer.max_steps, or what max_epochs gives when it is -1)
            max_steps=getattr(model, "max_steps_for_schedule", None) or int(self.cfg.trainer.get("max_steps", -1)),
        )
        pack = self.packing()
        if self.shards is not None:
            from nemo_avllm.data.dataset import collate_fn, packing_spec
            from nemo_avllm.data.shards import build_shard_loader

            if packing:  # the stream hands out a step's share at once; collate packs it
                spec = packing_spec(kw["seq_length"], int(m.micro_batch_size), pack["fixed_shape"], self.tokenizer,
                                    pack["thd"])
                kw.update(micro_batch_size=kw["global_batch_size"] // kw["dp_size"],
                          collate=collate_fn(kw["seq_length"], spec.pad_id, spec))
            dl = build_shard_loader(str(d.shards), self.tokenizer, m, **kw)  # endless: epochs advance inside
            plan = dl.dataset.plan
        else:
            dl = build_dataloader(self.samples, self.tokenizer, m, index=d.get("index"),
                                  feature_cache=self.feature_cache(), **pack, **kw)
            plan = dl.batch_sampler.plan
        log.info("%s", plan.describe())
        return _Epochs(dl)

    def val_loader(self, model):
        """This rank's validation micro-batches (same dataset, collate and feature cache)."""
        from megatron.core import parallel_state as ps

        from nemo_avllm.data.dataset import build_eval_dataloader

        m, d = self.cfg.model, self.cfg.model.data
        return build_eval_dataloader(
            self.val_samples,
            self.tokenizer,
            m,
            micro_batch_size=int(m.micro_batch_size),
            seq_length=int(m.seq_length),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            index=d.get("index"),
            feature_cache=self.feature_cache(),
            num_workers=int(d.get("num_workers", 2)),
            backend=d.get("decode_backend", "auto"),
            **self.packing(),
        )

    def packing(self) -> dict:
        """model.data.packing and the layout it takes: fixed micro-batch shapes with pipeline
        parallelism, Transformer Engine's THD when the model runs TE layers (`data.packing.make_spec`)."""
        from nemo_avllm.model.llm import resolve_transformer_impl

        m = self.cfg.model
        return {"packing": bool(m.data.get("packing", False)),
                "fixed_shape": int(m.get("pipeline_model_parallel_size", 1)) > 1,
                "thd": resolve_transformer_impl(m.get("transformer_impl", "auto")) == "transformer_engine"}


class _Epochs:
    """Cycles the loader's epochs: Lightning sees one endless epoch, `max_steps` ends training."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        while True:
            yield from self.loader
