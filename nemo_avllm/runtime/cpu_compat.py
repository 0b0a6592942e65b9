"""megatron-core on a machine without a CUDA device: the one place that makes it work.

megatron-core assumes CUDA in a few dozen places, of the kinds listed below. Rather than forking
it, `apply()` bends those assumptions once per process, and only when `torch.cuda.is_available()`
is False, so the same training code runs on a laptop, in CI and on a GPU cluster:

- `torch.cuda.current_device()` is used as an allocation device -> the CPU device;
- literal `device="cuda"` / `.cuda()` in schedules, masks, optimizer helpers -> a
  `TorchFunctionMode` that rewrites CUDA devices to the CPU;
- the causal-mask helper, which also runs inside autograd backward during activation recompute
  where function modes are not active -> a CPU version;
- the CUDA RNG tracker -> a tracker that forks the CPU generator with the same seed offsets;
- the CUDA generator itself (`torch.cuda.get_rng_state`, megatron's `_get/_set_cuda_rng_state`,
  which activation recompute uses to replay dropout) -> the CPU generator, the one the tracker
  and the model's dropout draw from here;
- `torch.cuda.synchronize` / `current_stream` / events used by p2p and DDP -> no-ops;
- `Tensor.type()` string checks in megatron's optimizers -> CPU tensors report CUDA type names.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED = False
_MODE: TorchFunctionMode | None = None
CPU = torch.device("cpu")


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites any CUDA device argument to the CPU; `.cuda()` becomes the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            # megatron's optimizers assert `grad.type() == 'torch.cuda.FloatTensor'` (and pick
            # fp16/bf16 paths by the same strings): report CPU tensors under their CUDA names.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream/event: CPU ops are already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullStream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker over the CPU generator (same names, same seed offsets)."""

        def __init__(self, *args, **kwargs):
            kwargs["use_cudagraphable_rng"] = False
            super().__init__(*args, **kwargs)

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=CPU), diagonal=1).bool()


def _patch_module_attr(modname: str, attr: str, value) -> None:
    import importlib

    mod = importlib.import_module(modname)
    setattr(mod, attr, value)


def apply() -> bool:
    """Apply the CPU shims if there is no CUDA device. Returns True when they are active."""
    global _APPLIED, _MODE
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    torch.cuda.current_device = lambda: CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    # classes, not functions: libraries evaluate `torch.cuda.Stream | None` in annotations
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.stream = lambda *a, **k: _NullStream()
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.get_device_capability = lambda *a, **k: (0, 0)
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    # "the CUDA generator" is the CPU one: recompute saves it before a checkpointed forward and
    # restores it before the replay, so dropout masks match (megatron's own setter would queue a
    # lazy CUDA call that never runs)
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = _get_cpu_rng_state
    torch.cuda.set_rng_state = torch.cuda.random.set_rng_state = _set_cpu_rng_state

    # Imported late: this module must stay importable without megatron for light tools.
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    mrandom.CudaRNGStatesTracker = _make_cpu_rng_tracker_class()
    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.initialize_rng_tracker(force_reset=True)
    tutils.get_default_causal_mask = functools.lru_cache(maxsize=8)(_cpu_causal_mask)
    # modules that imported the helper by name keep their own reference
    for modname in (
        "megatron.core.transformer.dot_product_attention",
        "megatron.core.fusions.fused_softmax",
    ):
        with contextlib.suppress(ImportError, AttributeError):
            _patch_module_attr(modname, "get_default_causal_mask", tutils.get_default_causal_mask)

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _APPLIED = True
    log.info("no CUDA device: megatron-core CPU compatibility shims applied")
    return True


def is_applied() -> bool:
    return _APPLIED
