"""Linear projectors W_t, W_s, W_a (paper Eq. 4): encoder width -> LLM width.

Tensor-parallel aware: a megatron `ColumnParallelLinear` whose output columns are split over the
TP ranks and gathered, so every rank holds the full projected embedding that the (replicated)
LLM input needs, while each rank stores and updates only 1/TP of the weights.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn


class Projector(MegatronModule):
    """A MegatronModule, so checkpoints record its weights as TP-sharded, not replicated."""

    def __init__(self, in_features: int, out_features: int, config):
        super().__init__(config=config)
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.linear = ColumnParallelLinear(
            in_features,
            out_features,
            config=config,
            init_method=nn.init.xavier_uniform_,
            bias=True,
            gather_output=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear(x.to(self.linear.weight.dtype))
        return out
