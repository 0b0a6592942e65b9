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
from nemo_avllm.training import broadcast, optim

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
    """A NaN/inf loss or gradient with `model.nan_policy=stop`, or more than
    `model.max_consecutive_skipped_steps` such steps in a row with `skip`."""


class AVLLMModel(ModelPT):
    def __init__(self, cfg: DictConfig, trainer: Trainer | None = None):
        super().__init__(cfg=cfg, trainer=trainer)
        self.automatic_optimization = False
        self.module = None  # megatron DDP(AVLLM) of this rank
        self.optimizer = None
        self.scheduler = None
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.consecutive_skipped_steps = 0
        self.train_loader_factory = None  # set by the training entry point (data pipeline)
        self.val_loader_factory = None  # set with model.data.validation_manifest
        self.val_check_interval = None  # trainer.val_check_interval: steps between validations
        self._val_loader = None
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
        from nemo_avllm.model.provider import avllm_config

        return avllm_config(self._cfg).layout()

    # --- building ---------------------------------------------------------------------------
    @property
    def parallel(self) -> dict:
        c = self._cfg
        return {
            "tp": int(c.get("tensor_model_parallel_size", 1)),
            "pp": int(c.get("pipeline_model_parallel_size", 1)),
        }

    def use_distributed_optimizer(self) -> bool:
        return optim.distributed_optimizer_setting(self._cfg, distributed.has_gpu())

    def configure_model(self) -> None:
        """Build this rank's model, restore its weights, then wrap it in megatron DDP and build the
        optimizer. The order matters: megatron's mixed-precision optimizer keeps fp32 master copies
        of the bf16 weights taken when it is built (restored weights must be in place by then), and
        DDP picks its gradient scale from `calculate_per_token_loss` when it is built."""
        if self.module is not None:
            return
        from nemo_avllm.model.provider import build_model
        from nemo_avllm.training import restore

        weights = restore.plan(self._cfg)  # refuses silently random weights before building
        max_steps = self.max_steps_for_schedule or self.trainer.max_steps
        if max_steps is None or max_steps < 1:
            raise ValueError("trainer.max_steps must be known before the model is configured")
        model = build_model(self._cfg)
        if self._cfg.get("projector_init", "xavier") == "feature_stats" and model.pre_process:
            from nemo_avllm.data.features import FeatureCache
            from nemo_avllm.data.manifest import read_inputs

            train_ids = [it.id for it in read_inputs(self._cfg.data.train_manifest)]  # not held-out clips
            done = model.standardize_projector_inputs(feature_stats(FeatureCache(self._cfg.data.feature_cache), train_ids))
            log.info("projectors initialised on standardised encoder outputs of the training clips (%s)",
                     ", ".join(done))
        if distributed.has_gpu():
            model.cuda()
        restore.restore(weights, model)  # restored projectors replace the initial ones
        if weights.path:
            log.info("model weights restored from %s", weights.path)
        self.module, self.optimizer = optim.setup_training(model, self._cfg, self.use_distributed_optimizer(),
                                                           distributed.has_gpu())
        self.scheduler = optim.build_scheduler(self.optimizer, self._cfg.optim, max_steps)

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

    def schedule_shape(self) -> tuple[int, int]:
        """(seq_length, micro_batch_size) of the activations pipeline stages exchange."""
        seq_length, mbs = int(self._cfg.seq_length), int(self._cfg.micro_batch_size)
        if not self._cfg.data.get("packing", False):
            return seq_length, mbs
        from nemo_avllm.data.packing import schedule_shape

        return schedule_shape(seq_length, mbs, self.avllm.cfg.transformer_impl == "transformer_engine")

    # --- one step ----------------------------------------------------------------------------
    def training_step(self, dataloader_iter):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_avllm.training.step import forward_step

        t0 = time.perf_counter()
        stats = {"samples": 0, "tokens": 0, "V": 0, "A": 0, "AV": 0}
        waited = [0.0]  # data-stall telemetry: time spent waiting for the loader

        def fetch():
            t = time.perf_counter()
            batch = next(dataloader_iter)
            waited[0] += time.perf_counter() - t
            return batch[0] if isinstance(batch, tuple) else batch  # Lightning: (batch, idx, dl_idx)

        # a packed step is one loader item (its micro-batches); unpacked, one item per micro-batch
        n_mb, source = broadcast.step_source(fetch(), fetch, lambda: self.num_microbatches)
        seq_length, mbs = self.schedule_shape()

        def microbatches():
            for _ in range(n_mb):
                # read on TP rank 0 of the stages that use data, broadcast to the other TP ranks
                batch = broadcast.stage_batch(source(), distributed.device())
                if "input_ids" in batch:
                    _count(batch, stats)
                yield batch

        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=microbatches(),
            model=[self.module],
            num_microbatches=n_mb,
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=False,
        )
        loss = self._reduce_loss(losses)
        step = self.trainer.global_step
        problem = None
        if not math.isfinite(loss):
            problem = f"non-finite loss {loss}"
        elif self._cfg.params_dtype != "fp16" and not optim.grads_are_finite(self.module):
            # (fp16: megatron's loss scaler finds inf/NaN itself and skips the step)
            problem = f"non-finite gradients (loss {loss:.6g})"
        if problem is not None:
            self._skip_or_stop(problem, step)
            grad_norm = float("nan")
        else:
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.consecutive_skipped_steps = 0
        self.consumed_samples += int(self._cfg.global_batch_size)
        # Lightning counts optimizer steps through its (unused) optimizer; advance it by hand
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_completed()
        dt = time.perf_counter() - t0
        val = self.run_validation() if self._validation_due() else {}
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
                "skipped_steps": float(self.skipped_steps),
                "step_time_s": dt,
                "data_wait_s": waited[0],
                "compute_s": dt - waited[0],
                "micro_batches": float(n_mb),
        }
        self.log_dict(
            self.last_metrics,
            prog_bar=False,
            on_step=True,
            batch_size=1,
            rank_zero_only=True,
        )
        self.log("loss", loss, prog_bar=True, on_step=True, batch_size=1, rank_zero_only=True)
        if val:
            self.last_metrics.update(val)
            # callback metrics (the checkpoint callback ranks by val_loss), on every rank alike
            self.log_dict(val, logger=False, on_step=True, batch_size=1)
            for logger in self.trainer.loggers:  # every validation, not every log_every_n_steps
                logger.log_metrics(val, step=self.trainer.global_step)
        return None

    # --- validation --------------------------------------------------------------------------
    def _validation_due(self) -> bool:
        every = self.val_check_interval
        return self.val_loader_factory is not None and bool(every) and self.trainer.global_step % every == 0

    def run_validation(self) -> dict[str, float]:
        """Token-averaged loss over the validation set, overall and per modality (`val_loss`,
        `val_loss_V`, `val_loss_A`, `val_loss_AV`): forward only through megatron's schedule,
        dropout off; the same numbers on every rank."""
        if self._val_loader is None:
            self._val_loader = self.val_loader_factory(self)
        return validation_losses(self.module, self._val_loader, *self.schedule_shape())

    def _skip_or_stop(self, problem: str, step: int) -> None:
        """`model.nan_policy`: skip the optimizer step (weights and schedule unchanged), or stop;
        a run that keeps skipping is diverging, so skipping too stops after
        `model.max_consecutive_skipped_steps` skipped steps in a row."""
        msg = f"{problem} at step {step} (consumed samples {self.consumed_samples})"
        if self._cfg.get("nan_policy", "skip") == "stop":
            raise NonFiniteLossError(msg + "; stopping (model.nan_policy=stop)")
        self.skipped_steps += 1
        self.consecutive_skipped_steps += 1
        limit = int(self._cfg.get("max_consecutive_skipped_steps", 10))
        if self.consecutive_skipped_steps > limit:
            first = step - self.consecutive_skipped_steps + 1
            raise NonFiniteLossError(
                f"{msg}: {self.consecutive_skipped_steps} steps in a row (steps {first} to {step}) had non-finite "
                f"loss or gradients, more than model.max_consecutive_skipped_steps={limit}; the run diverges: "
                f"resume from an earlier checkpoint with a lower model.optim.lr, or check the data of these steps")
        log.warning("%s: skipping the optimizer step (model.nan_policy=skip)", msg)

    def _reduce_loss(self, losses) -> float:
        """Token-averaged loss of the global batch, the same number on every rank."""
        from megatron.core import parallel_state as ps

        pair = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for d in losses:
                pair += d["lm loss"].detach().double().cpu()
        pair = _sum_over_ranks(pair)
        return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")

    # --- checkpoint state --------------------------------------------------------------------
    def common_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "consecutive_skipped_steps": self.consecutive_skipped_steps,
            "cfg": self._cfg,
        }

    def load_common_state(self, state: dict) -> None:
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skipped_steps = int(state.get("consecutive_skipped_steps", 0))


def validation_losses(module, loader, seq_length: int, micro_batch_size: int) -> dict[str, float]:
    """`val_loss` and `val_loss_{V,A,AV}` of `module` (megatron DDP) over `loader` (an eval
    loader: `batch_sampler.real_rows`), token-averaged; the same numbers on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm.training.step import GROUPS, validation_forward_step, validation_targets

    real_rows = loader.batch_sampler.real_rows

    def microbatches():
        for batch, real in zip(loader, real_rows):
            if isinstance(batch, list):  # packed: an eval micro-batch packs into one
                (batch,) = batch
            yield broadcast.stage_batch(validation_targets(batch, real), distributed.device())

    sums = torch.zeros(len(GROUPS), 2, dtype=torch.float64)
    if real_rows:  # a data-parallel rank may have no validation sample
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = get_forward_backward_func()(
                    forward_step_func=validation_forward_step,
                    data_iterator=microbatches(),
                    model=[module],
                    num_microbatches=len(real_rows),
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=True,
                )
        finally:
            module.train(was_training)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for d in out:
                sums += d["groups"].double().cpu()
    sums = _sum_over_ranks(sums)
    loss, tokens = sums.sum(0).tolist()
    metrics = {"val_loss": loss / tokens if tokens else float("nan")}
    for name, (g_loss, g_tokens) in zip(GROUPS, sums.tolist()):
        if name != "T" and g_tokens:
            metrics[f"val_loss_{name}"] = g_loss / g_tokens
    return metrics


def _count(batch: dict, stats: dict) -> None:
    ids = batch["input_ids"]
    stats["samples"] += ids.shape[0]
    stats["tokens"] += int((ids != 0).sum())
    vis, aud = modality.needs_visual(ids), modality.needs_audio(ids)
    stats["AV"] += int((vis & aud).sum())
    stats["V"] += int((vis & ~aud).sum())
    stats["A"] += int((aud & ~vis).sum())


def _sum_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    """Loss sums held by the last pipeline stage of each data-parallel replica -> their total,
    the same on every rank. Sums over all ranks (other stages contribute zeros); TP ranks hold
    the same value, so their copies are divided out."""
    if not torch.distributed.is_initialized():
        return sums
    from megatron.core import parallel_state as ps

    total = sums.to(distributed.device())
    torch.distributed.all_reduce(total)
    return total.cpu() / ps.get_tensor_model_parallel_world_size()


def _all_reduce_counts(stats: dict) -> dict:
    """Counts over data-parallel ranks (every TP/PP rank of a DP replica sees the same data)."""
    if not torch.distributed.is_initialized():
        return stats
    from megatron.core import parallel_state as ps

    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], device=distributed.device())
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return dict(zip(keys, t.cpu().tolist()))
