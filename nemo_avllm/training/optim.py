"""What trains, and how: stage freezing, megatron DDP, the megatron optimizer and LR schedule.

Paper §4.1: stage 1 trains the projectors only, stage 2 the projectors and the LLM; the encoders
are frozen in both. AdamW with betas (0.9, 0.98), cosine schedule with a warm-up ratio. On GPU
nodes the distributed optimizer shards the optimizer state over data-parallel ranks."""

from __future__ import annotations

import contextlib
import math

import torch

TRAINABLE_PARTS = ("projectors", "llm")


def freeze_for_stage(model, trainable: list[str]) -> dict[str, int]:
    """Set `requires_grad` per part: `projectors`, `llm`; encoders are always frozen.
    Returns the number of trainable parameters per part (this rank)."""
    unknown = set(trainable) - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"model.trainable: unknown parts {sorted(unknown)}; choose from {TRAINABLE_PARTS}")
    counts = {p: 0 for p in TRAINABLE_PARTS}
    for name, param in model.named_parameters():
        if name.startswith(("vision.", "audio.")):
            param.requires_grad_(False)
            continue
        part = "projectors" if name.startswith("proj_") else "llm"
        param.requires_grad_(part in trainable)
        counts[part] += param.numel() if part in trainable else 0
    return counts


def _setting(model_cfg, key: str, default: bool) -> bool:
    value = model_cfg.get(key, "auto")
    if value == "auto":
        return default
    if not isinstance(value, bool):
        raise ValueError(f"model.{key}={value!r}; expected auto, true or false")
    return value


def distributed_optimizer_setting(model_cfg, gpu: bool) -> bool:
    """`model.use_distributed_optimizer`: `auto` (default) = on with GPUs (optimizer state
    sharded over data-parallel ranks). It also runs, saves and loads on CPU when forced."""
    return _setting(model_cfg, "use_distributed_optimizer", gpu)


def overlap_settings(model_cfg, use_distributed_optimizer: bool, gpu: bool) -> dict[str, bool]:
    """`model.overlap_grad_reduce` / `model.overlap_param_gather`: `auto` (default) = on with GPUs
    (param-gather overlap only with the distributed optimizer, which is what gathers params)."""
    out = {
        "overlap_grad_reduce": _setting(model_cfg, "overlap_grad_reduce", gpu),
        "overlap_param_gather": _setting(model_cfg, "overlap_param_gather", gpu and use_distributed_optimizer),
    }
    if out["overlap_param_gather"] and not use_distributed_optimizer:
        raise ValueError("model.overlap_param_gather=true needs the distributed optimizer (model.use_distributed_optimizer)")
    return out


def gpu_defaults(model_cfg) -> dict[str, bool]:
    """What the `auto` keys resolve to on a GPU node for `model_cfg`: the settings the CPU tests
    force on to run the GPU configuration's code over gloo."""
    dist_opt = distributed_optimizer_setting(model_cfg, True)
    return {"use_distributed_optimizer": dist_opt, **overlap_settings(model_cfg, dist_opt, True)}


@contextlib.contextmanager
def params_synced(ddp_model):
    """Parameters all-gathered now (a checkpoint save): with param-gather overlap they are
    otherwise gathered lazily in the next forward (Megatron-LM does the same around saves)."""
    overlap = getattr(getattr(ddp_model, "ddp_config", None), "overlap_param_gather", False)
    if not overlap:
        yield
        return
    ddp_model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp_model.enable_forward_pre_hook()


def wrap_ddp(model, use_distributed_optimizer: bool, overlap_grad_reduce: bool = False,
             overlap_param_gather: bool = False):
    """megatron-core DDP: contiguous fp32 grad buffers, summed over data-parallel ranks; the
    reduce (and, with the distributed optimizer, the param all-gather) overlapped with compute.

    The loss is per token (`training.step.loss_func` returns loss sums and token counts): the
    schedule leaves gradients unscaled, DDP sums them over data-parallel ranks, and
    `finalize_model_grads` divides by the global batch's token count. DDP chooses its gradient
    scale when it is built (1/dp unless `calculate_per_token_loss`), so the flag is set here,
    before; `average_in_collective` stays False (megatron refuses it with per-token loss)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model.config.calculate_per_token_loss = True

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # it raises; model.nan_policy skips or stops (grads_are_finite)
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def grads_are_finite(ddp_model) -> bool:
    """True when every gradient of every rank is finite; checked after the gradient reduction and
    before the optimizer step. megatron's bf16/fp32 optimizers would apply a NaN/inf gradient
    (a NaN norm gives a NaN clip coefficient, so clipping does not stop it): one bad micro-batch
    would make every weight NaN. One sum per gradient buffer (no copy of the
    buffer): it is non-finite when any element is, and one all-reduce of a flag."""
    from nemo_avllm.runtime import distributed

    bad = torch.zeros((), dtype=torch.float32, device=distributed.device())
    for buffer in ddp_model.buffers + ddp_model.expert_parallel_buffers:  # no host sync in the loop
        bad = torch.maximum(bad, (~torch.isfinite(buffer.grad_data.sum(dtype=torch.float32))).float())
    if torch.distributed.is_initialized():
        # every rank: TP/PP ranks hold other parameters; with the distributed optimizer each
        # DP rank's buffer holds its own unreduced gradients outside its shard
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def build_optimizer(ddp_model, optim_cfg, params_dtype: torch.dtype, use_distributed_optimizer: bool):
    """megatron's optimizer (AdamW: decoupled weight decay) with gradient clipping."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    betas = list(optim_cfg.betas)
    config = OptimizerConfig(
        optimizer="adam",
        lr=float(optim_cfg.lr),
        min_lr=float(optim_cfg.get("min_lr", 0.0)),
        weight_decay=float(optim_cfg.weight_decay),
        adam_beta1=float(betas[0]),
        adam_beta2=float(betas[1]),
        adam_eps=float(optim_cfg.get("eps", 1e-8)),
        clip_grad=float(optim_cfg.clip_grad),
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [ddp_model])


def _torch_adam_dist_optimizers(optimizer) -> list:
    """The distributed optimizers of `optimizer` that run torch's own Adam (no Transformer Engine
    or Apex fused Adam: CPU, a bare CUDA machine)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, distrib_optimizer.DistributedOptimizer)]


@contextlib.contextmanager
def loading_state(optimizer):
    """Around loading a checkpoint into `optimizer`: megatron's distributed optimizer over torch's
    Adam (a) asserts when the Adam state does not exist yet (it reads the step count from it),
    and (b) restores the step count, then overwrites it with the unstepped template's while
    copying the parameter state. (a) one step with zero gradients, learning rate and weight
    decay creates the state and changes no weight; (b) the step count is put back from the
    loaded param groups, where megatron stores it."""
    opts = _torch_adam_dist_optimizers(optimizer)
    for opt in opts:
        inner = opt.optimizer
        if inner.state:
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd
    yield
    for opt in opts:
        for g in opt.optimizer.param_groups:
            if g.get("step") is None:
                continue
            for p in g["params"]:
                if "step" in opt.optimizer.state.get(p, {}):
                    opt.optimizer.state[p]["step"] = torch.tensor(float(g["step"]))


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """ceil(ratio x steps), clamped below `max_steps`: megatron's scheduler needs
    warm-up < decay steps, and a 1-step run (smoke test) must still train its step."""
    return max(0, min(int(math.ceil(warmup_ratio * max_steps)), max_steps - 1))


def build_scheduler(optimizer, optim_cfg, max_steps: int):
    """Linear warm-up for `warmup_ratio` of the steps, then cosine decay to `min_lr`."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    lr = float(optim_cfg.lr)
    wd = float(optim_cfg.weight_decay)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=float(optim_cfg.get("min_lr", 0.0)),
        lr_warmup_steps=warmup_steps(max_steps, float(optim_cfg.warmup_ratio)),
        lr_decay_steps=max_steps,
        lr_decay_style=str(optim_cfg.get("sched", "cosine")),
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=max_steps,
        wd_incr_style="constant",
    )


def setup_training(model, model_cfg, use_distributed_optimizer: bool, gpu: bool):
    """Stage freezing, megatron DDP (with the configured overlaps), optimizer and the megatron
    config hooks the pipeline schedules call, for a model built by the provider. Returns
    (ddp_model, optimizer). For tools that train without Lightning (benchmarks, GPU checks)."""
    from megatron.core.distributed import finalize_model_grads

    from nemo_avllm.model.provider import DTYPES

    freeze_for_stage(model, list(model_cfg.trainable))
    ddp = wrap_ddp(model, use_distributed_optimizer, **overlap_settings(model_cfg, use_distributed_optimizer, gpu))
    optimizer = build_optimizer(ddp, model_cfg.optim, DTYPES[model_cfg.params_dtype], use_distributed_optimizer)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = ddp.no_sync
    return ddp, optimizer
