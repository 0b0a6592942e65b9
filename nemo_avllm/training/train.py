"""`avllm train` / `scripts/train.py`: config -> trainer + exp_manager + AVLLMModel -> fit.

The one training entry point. Everything it needs comes from the composed Hydra config
(`conf/stage1_pretrain.yaml`, `conf/stage2_finetune.yaml`); `validate` refuses bad settings
before any weights are allocated."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# trainer.* keys that belong to us, not to lightning.Trainer
_OWN_TRAINER_KEYS = ("seed",)


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Clear errors for settings that cannot work, before any heavy work."""
    from nemo_avllm.model.provider import megatron_config

    m = cfg.model
    megatron_config(m)  # TP/PP vs heads/layers/vocab, dtype
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    if world_size is None:
        world_size = int(cfg.trainer.devices) * int(cfg.trainer.get("num_nodes", 1)) if str(cfg.trainer.devices).isdigit() else None
    if world_size is not None:
        if world_size % (tp * pp):
            raise ValueError(
                f"trainer.devices x trainer.num_nodes = {world_size} processes is not divisible by "
                f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp}"
            )
        dp = world_size // (tp * pp)
        gbs, mbs = int(m.global_batch_size), int(m.micro_batch_size)
        if gbs % (mbs * dp):
            raise ValueError(
                f"model.global_batch_size={gbs} is not divisible by model.micro_batch_size ({mbs}) x data-parallel "
                f"size ({dp} = {world_size} processes / (TP {tp} x PP {pp})); choose e.g. global_batch_size="
                f"{mbs * dp * max(1, gbs // (mbs * dp))}"
            )
    if int(m.seq_length) > int(m.llm.max_position_embeddings):
        raise ValueError(f"model.seq_length={m.seq_length} exceeds model.llm.max_position_embeddings={m.llm.max_position_embeddings}")
    if m.get("projector_init", "xavier") not in ("xavier", "feature_stats"):
        raise ValueError(f"model.projector_init={m.projector_init!r}; expected xavier or feature_stats")
    if m.get("projector_init") == "feature_stats" and not (m.get("data") or {}).get("feature_cache"):
        raise ValueError("model.projector_init=feature_stats reads encoder-output statistics from the feature "
                         "cache: set model.data.feature_cache (build it with `avllm features`) or use "
                         "model.projector_init=xavier")
    if m.get("nan_policy", "skip") not in ("skip", "stop"):
        raise ValueError(f"model.nan_policy={m.nan_policy!r}; expected skip or stop")
    data = m.get("data") or {}
    if data.get("feature_cache"):
        from nemo_avllm.data.features import FeatureCache

        FeatureCache(data.feature_cache, m)  # refuses a cache made with other encoders / T / K
    if str(cfg.trainer.get("precision", "32")) not in ("32", "32-true"):
        raise ValueError(
            f"trainer.precision={cfg.trainer.precision}: precision is set by model.params_dtype "
            f"(bf16/fp16/fp32) and handled by megatron; leave trainer.precision at 32"
        )


def max_steps(cfg: DictConfig, num_samples: int) -> int:
    """trainer.max_steps, or epochs x samples / global batch when it is -1."""
    steps = int(cfg.trainer.get("max_steps", -1))
    if steps > 0:
        return steps
    epochs = int(cfg.trainer.get("max_epochs", 1))
    return max(1, math.floor(epochs * num_samples / int(cfg.model.global_batch_size)))


def build_trainer(cfg: DictConfig, steps: int, callbacks=()):
    import lightning.pytorch as pl

    from nemo_avllm.training.strategy import MegatronStrategy

    strategy = MegatronStrategy(
        tensor_model_parallel_size=cfg.model.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.model.pipeline_model_parallel_size,
        seed=int(cfg.trainer.get("seed", 1234)),
    )
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in _OWN_TRAINER_KEYS}
    kwargs.update(
        max_steps=steps,
        max_epochs=-1,  # the step count decides; the sampler cycles epochs itself
        strategy=strategy,
        logger=False,  # exp_manager creates the loggers
        enable_checkpointing=False,  # exp_manager creates the checkpoint callback
        use_distributed_sampler=False,  # the MAT sampler shards over data-parallel ranks
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    if kwargs.get("accelerator", "auto") == "auto":
        import torch

        kwargs["accelerator"] = "gpu" if torch.cuda.is_available() else "cpu"
    return pl.Trainer(**kwargs)


def train(cfg: DictConfig, data=None):
    """Run one training stage. `data` provides `num_samples` and `loader(model, consumed)`;
    by default it is built from `cfg.model.data`."""
    from nemo.utils.exp_manager import exp_manager

    from nemo_avllm.training.model import AVLLMModel

    validate(cfg)
    if cfg.model.get("data") and cfg.model.data.get("feature_cache") and cfg.model.get("build_encoders", True):
        # training reads cached encoder outputs: never build (or load) the frozen encoders
        cfg = with_overrides(cfg, **{"model.build_encoders": False})
    if data is None:
        from nemo_avllm.training.data import TrainData

        data = TrainData(cfg)
    from nemo_avllm.training.callbacks import MetricsJsonl

    steps = max_steps(cfg, data.num_samples)
    em = cfg.get("exp_manager") or {}
    if em.get("exp_dir") and em.get("name"):
        from pathlib import Path

        from nemo_avllm.training.checkpoint import recover_interrupted_saves

        for p in recover_interrupted_saves(Path(em.exp_dir) / em.name / "checkpoints"):
            log.warning("recovered checkpoint %s from an interrupted save", p)
    trainer = build_trainer(cfg, steps)
    log_dir = exp_manager(trainer, cfg.get("exp_manager"))
    trainer.callbacks.append(MetricsJsonl(log_dir))
    _ensure_preemption_callback(trainer, em)
    model = AVLLMModel(cfg.model, trainer=trainer)
    model.max_steps_for_schedule = steps
    model.train_loader_factory = data.loader
    trainer.fit(model)
    return model, trainer, log_dir


def _ensure_preemption_callback(trainer, em) -> None:
    """SIGTERM from a scheduler writes a last checkpoint. NeMo's exp_manager adds its
    PreemptionCallback only on GPUs; the callback itself works on CPU too (gloo), so add it."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from nemo.utils.callbacks import PreemptionCallback

    if not em.get("create_preemption_callback", True):
        return
    if any(isinstance(c, PreemptionCallback) for c in trainer.callbacks):
        return
    ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    if ckpt is not None:
        trainer.callbacks.append(PreemptionCallback(ckpt))


def with_overrides(cfg: DictConfig, **values) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        for k, v in values.items():
            OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def main(cfg: DictConfig) -> int:
    """`avllm train` / `scripts/train.py`."""
    train(cfg)
    return 0
