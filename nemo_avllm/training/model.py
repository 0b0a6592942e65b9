"""`AVLLMModel`: the NeMo model class (a `ModelPT`) that trains the Audio-Visual LLM.

Lightning runs the loop (progress bar, loggers, checkpoint callbacks, signals); each training
step is one global batch: megatron-core's forward-backward function pulls the micro-batches,
runs them through the pipeline schedule, then the megatron optimizer steps (manual
optimisation). Parallel state exists before `configure_model` (the `MegatronStrategy` sets it up),
so the model is built there, already sharded for this rank."""

from __future__ import annotations

import logging
import math
import time

import torch
from lightning.pytorch import Trainer
from nemo.core.classes import ModelPT
from omegaconf import DictConfig

from nemo_avllm import modality
from nemo_avllm.runtime import distributed
from nemo_avllm.training import optim

log = logging.getLogger(__name__)


def feature_stats(cache, ids=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-dimension mean and standard deviation of each kind of cached encoder token
    (`nemo_avllm.data.features.FeatureCache`; `ids`: only these media ids, e.g. the training
    set's), float32 [D] each: what `projector_init=feature_stats` folds into the projectors."""
    sums: dict[str, list] = {}
    for mid in sorted(cache.index if ids is None else set(ids) & set(cache.index)):
        for kind, t in cache.get(mid).items():
            x = t.double().reshape(-1, t.shape[-1])
            acc = sums.setdefault(kind, [0, 0.0, 0.0])
            acc[0] += x.shape[0]
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + (x * x).sum(0)
    out = {}
    for kind, (n, s1, s2) in sums.items():
        mean = s1 / n
        out[kind] = (mean.float(), (s2 / n - mean * mean).clamp(min=0).sqrt().float())
    return out


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/inf and `model.nan_policy=stop`."""


class AVLLMModel(ModelPT):
    def __init__(self, cfg: DictConfig, trainer: Trainer | None = None):
        super().__init__(cfg=cfg, trainer=trainer)
        self.automatic_optimization = False
        self.module = None  # megatron DDP(AVLLM) of this rank
        self.optimizer = None
        self.scheduler = None
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.train_loader_factory = None  # set by the training entry point (data pipeline)
        self.max_steps_for_schedule = None

    # --- NeMo's ModelPT interface -----------------------------------------------------------
    @classmethod
    def list_available_models(cls):
        return None

    def setup_training_data(self, train_data_config):  # data comes from train_loader_factory
        pass

    def setup_validation_data(self, val_data_config):
        pass

    def configure_optimizers(self):
        """None for Lightning: the megatron optimizer and scheduler live in this module and are
        stepped in `training_step` (manual optimisation), saved by the MegatronStrategy."""
        return None

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: data loaders are built lazily from the sampler state (after resume)."""

    @property
    def layout(self):
        from nemo_avllm.data.dataset import layout_of

        return layout_of(self._cfg)

    # --- building ---------------------------------------------------------------------------
    @property
    def parallel(self) -> dict:
        c = self._cfg
        return {
            "tp": int(c.get("tensor_model_parallel_size", 1)),
            "pp": int(c.get("pipeline_model_parallel_size", 1)),
        }

    def use_distributed_optimizer(self) -> bool:
        value = self._cfg.get("use_distributed_optimizer", "auto")
        if value == "auto":
            return distributed.has_gpu()
        if value and not distributed.has_gpu():
            raise ValueError(
                "model.use_distributed_optimizer=true needs GPUs (megatron cannot save its state on CPU); "
                "use auto or false on CPU"
            )
        return bool(value)

    def configure_model(self) -> None:
        if self.module is not None:
            return
        from nemo_avllm.model.provider import DTYPES, build_model

        model = build_model(self._cfg)
        if self._cfg.get("projector_init", "xavier") == "feature_stats" and model.pre_process:
            from nemo_avllm.data.features import FeatureCache
            from nemo_avllm.data.prepare import read_inputs

            train_ids = [it.id for it in read_inputs(self._cfg.data.train_manifest)]  # not held-out clips
            done = model.standardize_projector_inputs(feature_stats(FeatureCache(self._cfg.data.feature_cache), train_ids))
            log.info("projectors initialised on standardised encoder outputs of the training clips (%s)",
                     ", ".join(done))
        if distributed.has_gpu():
            model.cuda()
        self.trainable_counts = optim.freeze_for_stage(model, list(self._cfg.trainable))
        dist_opt = self.use_distributed_optimizer()
        self.module = optim.wrap_ddp(model, dist_opt)
        self.optimizer = optim.build_optimizer(self.module, self._cfg.optim, DTYPES[self._cfg.params_dtype], dist_opt)
        cfg = model.config
        from megatron.core.distributed import finalize_model_grads

        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss
        cfg.no_sync_func = self.module.no_sync
        cfg.calculate_per_token_loss = True  # average over all loss tokens of the global batch
        max_steps = self.max_steps_for_schedule or self.trainer.max_steps
        if max_steps is None or max_steps < 1:
            raise ValueError("trainer.max_steps must be known before the model is configured")
        self.scheduler = optim.build_scheduler(self.optimizer, self._cfg.optim, max_steps)
        restore = self._cfg.get("restore_from")
        if restore:
            from nemo_avllm.training import checkpoint

            checkpoint.load(restore, self.module, strict=False)
            log.info("model weights restored from %s", restore)

    @property
    def avllm(self):
        return self.module.module

    # --- data --------------------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_world_size()
        gbs, mbs = int(self._cfg.global_batch_size), int(self._cfg.micro_batch_size)
        if gbs % (mbs * dp):
            raise ValueError(
                f"model.global_batch_size={gbs} is not divisible by micro_batch_size ({mbs}) x data-parallel "
                f"size ({dp}); change one of them"
            )
        return gbs // (mbs * dp)

    def train_dataloader(self):
        if self.train_loader_factory is None:
            raise RuntimeError("no training data: the entry point must set model.train_loader_factory")
        return self.train_loader_factory(self, self.consumed_samples)

    # --- one step ----------------------------------------------------------------------------
    def training_step(self, dataloader_iter):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_avllm.training.step import forward_step

        t0 = time.perf_counter()
        n_mb = self.num_microbatches
        stats = {"samples": 0, "tokens": 0, "V": 0, "A": 0, "AV": 0}

        def microbatches():
            for _ in range(n_mb):
                batch = next(dataloader_iter)
                if isinstance(batch, tuple):  # Lightning yields (batch, batch_idx, dataloader_idx)
                    batch = batch[0]
                _count(batch, stats)
                yield _to_device(batch)

        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=microbatches(),
            model=[self.module],
            num_microbatches=n_mb,
            seq_length=int(self._cfg.seq_length),
            micro_batch_size=int(self._cfg.micro_batch_size),
            forward_only=False,
        )
        loss = self._reduce_loss(losses)
        step = self.trainer.global_step
        if not math.isfinite(loss):
            policy = self._cfg.get("nan_policy", "skip")
            msg = f"non-finite loss {loss} at step {step} (consumed samples {self.consumed_samples})"
            if policy == "stop":
                raise NonFiniteLossError(msg + "; stopping (model.nan_policy=stop)")
            log.warning("%s: skipping the optimizer step (model.nan_policy=skip)", msg)
            self.skipped_steps += 1
            grad_norm = float("nan")
        else:
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        self.consumed_samples += int(self._cfg.global_batch_size)
        # Lightning counts optimizer steps through its (unused) optimizer; advance it by hand
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_completed()
        dt = time.perf_counter() - t0
        totals = _all_reduce_counts(stats)
        self.last_metrics = {
                "reduced_train_loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "tokens_per_s": totals["tokens"] / dt,
                "samples_V": float(totals["V"]),
                "samples_A": float(totals["A"]),
                "samples_AV": float(totals["AV"]),
                "consumed_samples": float(self.consumed_samples),
                "step_time_s": dt,
        }
        self.log_dict(
            self.last_metrics,
            prog_bar=False,
            on_step=True,
            batch_size=1,
            rank_zero_only=True,
        )
        self.log("loss", loss, prog_bar=True, on_step=True, batch_size=1, rank_zero_only=True)
        return None

    def _reduce_loss(self, losses) -> float:
        """Token-averaged loss of the global batch, the same number on every rank."""
        from megatron.core import parallel_state as ps

        pair = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for d in losses:
                pair += d["lm loss"].detach().double().cpu()
        if torch.distributed.is_initialized():
            dev = distributed.device()
            pair = pair.to(dev)
            # sum over data-parallel ranks and pipeline stages (only the last one is non-zero);
            # TP ranks hold the same value, so divide their copies out
            torch.distributed.all_reduce(pair)
            pair = pair.cpu() / ps.get_tensor_model_parallel_world_size()
        return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")

    # --- checkpoint state --------------------------------------------------------------------
    def common_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "cfg": self._cfg,
        }

    def load_common_state(self, state: dict) -> None:
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _count(batch: dict, stats: dict) -> None:
    ids = batch["input_ids"]
    stats["samples"] += ids.shape[0]
    stats["tokens"] += int((ids != 0).sum())
    vis, aud = modality.needs_visual(ids), modality.needs_audio(ids)
    stats["AV"] += int((vis & aud).sum())
    stats["V"] += int((vis & ~aud).sum())
    stats["A"] += int((aud & ~vis).sum())


def _all_reduce_counts(stats: dict) -> dict:
    """Counts over data-parallel ranks (every TP/PP rank of a DP replica sees the same data)."""
    if not torch.distributed.is_initialized():
        return stats
    from megatron.core import parallel_state as ps

    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], device=distributed.device())
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return dict(zip(keys, t.cpu().tolist()))


def _to_device(batch: dict) -> dict:
    if not distributed.has_gpu():
        return batch
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.cuda(non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.cuda(non_blocking=True) if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out
