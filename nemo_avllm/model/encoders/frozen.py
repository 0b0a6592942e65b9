"""What makes an encoder frozen: no grads, always eval mode, reproducible initial weights."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class FrozenEncoder(nn.Module):
    """Base class: parameters never require grad and `train()` keeps the module in eval mode.

    An encoder runs in a dtype of its own (`set_dtype`, from `model.encoder_dtype`), whatever the
    LLM trains in; its `forward` casts the inputs it gets to that dtype."""

    # Sub-modules kept in fp32 whatever the encoder's dtype (fixed signal-processing front ends).
    FP32_MODULES: tuple[str, ...] = ()

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def set_dtype(self, dtype: torch.dtype):
        """Cast the weights to `dtype`, except those under `FP32_MODULES`. Returns self."""
        keep = tuple(f"{m}." for m in self.FP32_MODULES)
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if t.is_floating_point() and not name.startswith(keep):
                t.data = t.data.to(dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in (that of its weights outside the fp32 front end)."""
        keep = tuple(f"{m}." for m in self.FP32_MODULES)
        return next(p.dtype for n, p in self.named_parameters() if not n.startswith(keep))

    def train(self, mode: bool = True):  # noqa: ARG002 - frozen in both stages (paper Fig. 2)
        return super().train(False)


@contextlib.contextmanager
def seeded_init(seed: int):
    """Build an encoder's initial weights from `seed` without touching the caller's RNG: a frozen
    encoder without a checkpoint keeps its random weights for good, so the same config must give
    the same encoder (and the same cached features) in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
