"""A Lightning strategy for megatron-core models (NeMo 3.0 no longer ships one).

- start-up: torch.distributed + megatron parallel state (TP/PP from the model config) through
  `nemo_avllm.runtime.distributed`, before the model is configured;
- no torch DDP: the model wraps itself in megatron DDP (gradient buffers, distributed optimizer);
- checkpoints: megatron `dist_checkpointing` folders holding model, optimizer, scheduler,
  data-sampler and Lightning loop state and the RNG states; loading reshards to the current TP/PP.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy

from nemo_avllm.runtime import distributed
from nemo_avllm.training import checkpoint as dist_ckpt
from nemo_avllm.training import optim

log = logging.getLogger(__name__)

LIGHTNING_KEY = "lightning"


def ckpt_dir(filepath) -> Path:
    """Lightning/NeMo name checkpoints `*.ckpt`; a dist checkpoint is the folder without it."""
    p = Path(filepath)
    return p.with_suffix("") if p.suffix == ".ckpt" else p


class MegatronStrategy(DDPStrategy):
    strategy_name = "megatron"

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234,
                 timeout_minutes: float = distributed.DEFAULT_TIMEOUT_MINUTES, **kwargs):
        timeout_minutes = distributed.check_timeout(timeout_minutes)
        super().__init__(timeout=timedelta(minutes=timeout_minutes), **kwargs)
        self.tp = int(tensor_model_parallel_size)
        self.pp = int(pipeline_model_parallel_size)
        self.seed = int(seed)
        self.timeout_minutes = timeout_minutes

    # --- start-up ---------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        self.set_world_ranks()
        self._process_group_backend = "nccl" if torch.cuda.is_available() else "gloo"
        distributed.initialize(self.tp, self.pp, seed=self.seed, timeout_minutes=self.timeout_minutes)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the optimizer exists only after configure_model

    def configure_ddp(self) -> None:
        """No torch DDP: megatron DDP is inside the model."""

    def model_to_device(self) -> None:
        if distributed.has_gpu():
            self.model.cuda(torch.cuda.current_device())

    @property
    def root_device(self) -> torch.device:
        return distributed.device()

    # --- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        module = self.lightning_module
        lightning_state = {k: v for k, v in checkpoint.items() if k != "state_dict"}  # weights are sharded
        common = {**module.common_state(), LIGHTNING_KEY: lightning_state}
        with optim.params_synced(module.module):
            dist_ckpt.save(ckpt_dir(filepath), module.module, module.optimizer, common, rng=True)

    def load_checkpoint(self, checkpoint_path) -> dict[str, Any]:
        module = self.lightning_module
        path = ckpt_dir(checkpoint_path)
        common = dist_ckpt.load(path, module.module, module.optimizer, rng=True)
        module.load_common_state(common)
        log.info("resumed from %s (consumed samples %d)", path, module.consumed_samples)
        state = dict(common.get(LIGHTNING_KEY, {}))
        state["state_dict"] = {}
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Weights were loaded in `load_checkpoint`."""

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Optimizer state was loaded in `load_checkpoint`."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(ckpt_dir(filepath), ignore_errors=True)

