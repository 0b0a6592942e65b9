"""Linear projectors W_t, W_s, W_a (paper Eq. 4): encoder width -> LLM width.

Tensor-parallel aware: a megatron `ColumnParallelLinear` whose output columns are split over the
TP ranks and gathered, so every rank holds the full projected embedding that the LLM input needs,
while each rank stores and updates only 1/TP of the weights.

The projector input is never sequence-sharded: encoder features are [b, L, d] and every TP rank
holds all of them (the splice into the text needs whole sequences; `AVLLM.embed` scatters to
sequence shards afterwards). So its linear runs without megatron's sequence-parallel input
all-gather, even when the LLM uses sequence parallelism: with it, megatron would all-gather
along dim 0, the batch here ((3, 5, 32) -> (6, 5, 64)).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.module import MegatronModule
from torch import nn


class Projector(MegatronModule):
    """A MegatronModule, so checkpoints record its weights as TP-sharded, not replicated."""

    def __init__(self, in_features: int, out_features: int, config):
        if config.sequence_parallel:
            config = copy.copy(config)  # the LLM keeps SP; this linear's input is replicated
            config.sequence_parallel = False
        super().__init__(config=config)
        from megatron.core.tensor_parallel import ColumnParallelLinear

        from nemo_avllm.model.llm import build_with_megatron_linears

        self.linear = build_with_megatron_linears(config, lambda: ColumnParallelLinear(
            in_features,
            out_features,
            config=config,
            init_method=_leave_as_is,  # initialised below, the same way on every path
            bias=True,
            gather_output=True,
            skip_bias_add=False,
        ))
        if config.perform_initialization:
            self._init_weight()

    @torch.no_grad()
    def _init_weight(self) -> None:
        """Xavier-uniform over the whole [out, in] matrix from the default generator, then this TP
        rank's rows. megatron's GPU initialisation would run xavier on each TP shard, whose fan
        sizes depend on TP (at TP=2 a ~1.29x wider distribution); this gives the same weights at
        any TP size and with CPU or GPU initialisation (megatron's CPU path draws the same
        master matrix from the same generator, so CPU runs keep their weights)."""
        from megatron.core import parallel_state as ps

        w = self.linear.weight
        master = torch.empty(self.linear.output_size, self.linear.input_size, dtype=torch.float)
        nn.init.xavier_uniform_(master)
        tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        rank = ps.get_tensor_model_parallel_rank() if tp > 1 else 0
        w.copy_(master.to(w.dtype).chunk(tp, dim=0)[rank].to(w.device))

    @property
    def in_features(self) -> int:
        return self.linear.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear(x.to(self.linear.weight.dtype))
        return out

    @torch.no_grad()
    def standardize_inputs(self, mean: torch.Tensor, std: torch.Tensor, floor: float = 0.01) -> None:
        """Fold per-dimension input statistics into the weights: the layer then maps
        (x - mean) / std through its initial weights. Still one linear map (paper Eq. 4), but it
        starts on the part of the features that differs between clips: frozen encoder outputs
        share a large common component (random-weight encoders: ~4x the clip-to-clip spread per
        dimension), which otherwise dominates the LLM's input tokens. `floor` (a fraction of the
        mean std) keeps near-constant dimensions from being blown up."""
        w, b = self.linear.weight, self.linear.bias
        std = std.to(w).clamp(min=float(std.mean()) * floor + 1e-12)
        w.div_(std)
        b.sub_(w @ mean.to(w))


def _leave_as_is(weight: torch.Tensor) -> None:
    """megatron's init hook, doing nothing: `Projector._init_weight` initialises the weight."""
