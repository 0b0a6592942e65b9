"""`avllm train` / `scripts/train.py`: config -> trainer + exp_manager + AVLLMModel -> fit.

The one training entry point. Everything it needs comes from the composed Hydra config
(`conf/stage1_pretrain.yaml`, `conf/stage2_finetune.yaml`); `validate` refuses bad settings
before any weights are allocated."""

from __future__ import annotations

import logging
import math
from functools import partial

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_avllm.config import check_values
from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)

# trainer.* keys that belong to us, not to lightning.Trainer (validation runs inside the training
# step, so the checkpoint of a step is ranked by that step's validation loss)
_OWN_TRAINER_KEYS = ("seed", "val_check_interval", "dist_timeout_minutes", "gpu_memory_gib")


def validate(cfg: DictConfig, world_size: int | None = None, paths: bool = True) -> None:
    """Refuse settings that cannot work, before any heavy work: every key's type and range and
    every input path (`config.check_values`), then the training checks that involve several keys.
    Raises `UserError` (the CLI prints it as one line)."""
    from nemo_avllm.model.provider import megatron_config

    check_values(cfg, paths=paths)
    m = cfg.model
    try:
        megatron_config(m)  # TP/PP vs heads/layers/vocab, dtype
    except ValueError as e:
        raise UserError(str(e)) from e
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    if world_size is None:
        world_size = int(cfg.trainer.devices) * int(cfg.trainer.get("num_nodes", 1)) if str(cfg.trainer.devices).isdigit() else None
    if world_size is not None:
        if world_size % (tp * pp):
            raise UserError(
                f"trainer.devices x trainer.num_nodes = {world_size} processes is not divisible by "
                f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp}"
            )
        dp = world_size // (tp * pp)
        gbs, mbs = int(m.global_batch_size), int(m.micro_batch_size)
        if gbs % (mbs * dp):
            raise UserError(
                f"model.global_batch_size={gbs} is not divisible by model.micro_batch_size ({mbs}) x data-parallel "
                f"size ({dp} = {world_size} processes / (TP {tp} x PP {pp})); choose e.g. global_batch_size="
                f"{mbs * dp * max(1, gbs // (mbs * dp))}"
            )
    from nemo_avllm.training import memory_plan

    try:
        memory_plan.preflight(cfg, world_size)  # on a CUDA node only; trainer.gpu_memory_gib overrides capacity
    except ValueError as e:
        raise UserError(str(e)) from e
    if int(m.seq_length) > int(m.llm.max_position_embeddings):
        raise UserError(f"model.seq_length={m.seq_length} exceeds model.llm.max_position_embeddings={m.llm.max_position_embeddings}")
    if float(m.optim.get("min_lr", 0.0)) > float(m.optim.lr):
        raise UserError(f"model.optim.min_lr={m.optim.min_lr} is above model.optim.lr={m.optim.lr}; the schedule decays "
                        f"from lr to min_lr, so give min_lr <= lr")
    if m.get("projector_init", "xavier") not in ("xavier", "feature_stats"):
        raise UserError(f"model.projector_init={m.projector_init!r}; expected xavier or feature_stats")
    if m.get("projector_init") == "feature_stats" and not (m.get("data") or {}).get("feature_cache"):
        raise UserError("model.projector_init=feature_stats reads encoder-output statistics from the feature "
                         "cache: set model.data.feature_cache (build it with `avllm features`) or use "
                         "model.projector_init=xavier")
    if m.get("nan_policy", "skip") not in ("skip", "stop"):
        raise UserError(f"model.nan_policy={m.nan_policy!r}; expected skip or stop")
    limit = m.get("max_consecutive_skipped_steps", 10)
    if not isinstance(limit, int) or limit < 0:
        raise UserError(f"model.max_consecutive_skipped_steps={limit!r}; expected an integer >= 0 (0: stop at the first bad step)")
    data = m.get("data") or {}
    if data.get("validation_manifest"):
        every = cfg.trainer.get("val_check_interval")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UserError(f"trainer.val_check_interval={every!r}: give the number of training steps between "
                             f"validations (an integer >= 1) when model.data.validation_manifest is set")
        ckpt = (cfg.get("exp_manager") or {}).get("checkpoint_callback_params") or {}
        save_every = ckpt.get("every_n_train_steps")
        if monitor_of(cfg) == "val_loss" and save_every and int(save_every) % every:
            raise UserError(
                f"exp_manager.checkpoint_callback_params.every_n_train_steps={save_every} is not a multiple of "
                f"trainer.val_check_interval={every}: checkpoints are ranked by the validation loss of their own "
                f"step; make it a multiple (e.g. {every * max(1, int(save_every) // every)})")
    if paths and data.get("feature_cache"):
        from nemo_avllm.training.feature_cache import open_cache

        open_cache(data.feature_cache, m)  # refuses a cache made with other encoders / T / K
    if str(cfg.trainer.get("precision", "32")) not in ("32", "32-true"):
        raise UserError(
            f"trainer.precision={cfg.trainer.precision}: precision is set by model.params_dtype "
            f"(bf16/fp16/fp32) and handled by megatron; leave trainer.precision at 32"
        )
    from nemo_avllm.training import restore

    restore.plan(m, files=paths)  # initial weights: restore_from, encoder checkpoints, allow_random_init


def check_launch(cfg: DictConfig) -> None:
    """The processes running are the ones the config asks for (`runtime.distributed.check_launch`)."""
    from nemo_avllm.runtime import distributed

    devices = cfg.trainer.devices
    if not str(devices).isdigit():
        raise UserError(f"trainer.devices={devices!r}: give the number of processes per node (one per GPU)")
    try:
        distributed.check_launch(int(devices) * int(cfg.trainer.get("num_nodes", 1)))
    except ValueError as e:
        raise UserError(str(e)) from e


def monitor_of(cfg: DictConfig) -> str:
    """What ranks the best-k checkpoints: checkpoint_callback_params.monitor, or when it is null
    the validation loss with a validation manifest and the training loss without one."""
    ckpt = (cfg.get("exp_manager") or {}).get("checkpoint_callback_params") or {}
    if ckpt.get("monitor"):
        return str(ckpt.monitor)
    data = cfg.model.get("data") or {}
    return "val_loss" if data.get("validation_manifest") else "reduced_train_loss"


def max_steps(cfg: DictConfig, num_samples: int) -> int:
    """trainer.max_steps, or epochs x samples / global batch when it is -1."""
    steps = int(cfg.trainer.get("max_steps", -1))
    if steps > 0:
        return steps
    epochs = int(cfg.trainer.get("max_epochs", 1))
    return max(1, math.floor(epochs * num_samples / int(cfg.model.global_batch_size)))


def build_trainer(cfg: DictConfig, steps: int, callbacks=()):
    import lightning.pytorch as pl

    from nemo_avllm.runtime import distributed
    from nemo_avllm.training.strategy import MegatronStrategy

    strategy = MegatronStrategy(
        tensor_model_parallel_size=cfg.model.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.model.pipeline_model_parallel_size,
        seed=int(cfg.trainer.get("seed", 1234)),
        timeout_minutes=cfg.trainer.get("dist_timeout_minutes", distributed.DEFAULT_TIMEOUT_MINUTES),
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
    """Run one training stage. `data` provides `num_samples` and `loader(model, consumed, max_steps)`;
    by default it is built from `cfg.model.data`."""
    validate(cfg)  # before the heavy imports: a bad setting is reported in a second
    check_launch(cfg)
    from nemo_avllm.training.lightning_module import AVLLMModel

    if cfg.model.get("data") and cfg.model.data.get("feature_cache") and cfg.model.get("build_encoders", True):
        # training reads cached encoder outputs: never build (or load) the frozen encoders
        cfg = with_overrides(cfg, **{"model.build_encoders": False})
    validate(cfg)
    if data is None:
        from nemo_avllm.training.data import TrainData

        data = TrainData(cfg)
    if getattr(data, "reads_features", False) and cfg.model.get("build_encoders", True):
        cfg = with_overrides(cfg, **{"model.build_encoders": False})  # shards of cached encoder tokens
    from nemo_avllm.training.callbacks import LastCheckpointAtEnd, MetricsJsonl

    steps = max_steps(cfg, data.num_samples)
    validation = bool((cfg.model.get("data") or {}).get("validation_manifest"))
    if validation and not hasattr(data, "val_loader"):
        raise ValueError(f"model.data.validation_manifest is set but the training data {type(data).__name__} has no val_loader")
    if cfg.get("exp_manager") and cfg.exp_manager.get("checkpoint_callback_params") is not None:
        cfg = with_overrides(cfg, **{"exp_manager.checkpoint_callback_params.monitor": monitor_of(cfg)})
    em = cfg.get("exp_manager") or {}
    from nemo_avllm.training import run_folder

    run = run_folder.prepare(cfg)  # the run folder's lock, failed saves cleaned, the checkpoint to resume
    trainer = build_trainer(cfg, steps)
    log_dir = run.exp_manager(trainer, cfg.get("exp_manager"))
    from nemo_avllm.training.restore import clear_finished, write_finished

    clear_finished(log_dir, trainer.is_global_zero)  # an earlier run's record does not speak for this one
    trainer.callbacks += [MetricsJsonl(log_dir), LastCheckpointAtEnd()]
    _ensure_preemption_callback(trainer, em)
    model = AVLLMModel(cfg.model, trainer=trainer)
    model.max_steps_for_schedule = steps  # the optimizer's schedule
    model.train_loader_factory = partial(data.loader, max_steps=steps)  # the modality schedule
    if validation:
        model.val_loader_factory = data.val_loader
        model.val_check_interval = int(cfg.trainer.val_check_interval)
    try:
        trainer.fit(model)
        if trainer.global_step >= steps and trainer.is_global_zero:  # not after a SIGTERM stop: stage 2 checks it
            write_finished(log_dir, trainer.global_step, steps)
    finally:
        run.release()
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
