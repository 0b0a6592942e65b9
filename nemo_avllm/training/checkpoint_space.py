"""Whether a checkpoint fits on disk: the bytes a save writes, over all ranks, against the free space,
checked before the save starts and again when a write fails (the disk may fill meanwhile)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from nemo_avllm.errors import UserError


class DiskFullError(UserError):
    """Not enough free space for a checkpoint."""


def bytes_to_write(state: dict) -> int:
    """Bytes all ranks together write for `state` (each tensor shard once)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    n = sum(v.data.numel() * v.data.element_size() for v in nested_values(state)
            if isinstance(v, ShardedTensor) and v.data is not None and is_main_replica(v.replica_id))
    n += sum(v.data.numel() * v.data.element_size() for v in nested_values(state)
             if not isinstance(v, ShardedTensor) and isinstance(getattr(v, "data", None), torch.Tensor))
    if torch.distributed.is_initialized():
        from nemo_avllm.runtime import distributed

        t = torch.tensor([n], dtype=torch.int64, device=distributed.device())
        torch.distributed.all_reduce(t)
        n = int(t.item())
    return n


def space_shortfall(path: Path, need: int, failed: bool = False) -> str | None:
    """The one-line reason when the file system of `path` has less than `need` bytes (plus a
    margin for metadata) free, or a write there `failed` for space (the disk filled meanwhile),
    else None."""
    need = int(need * 1.02) + (4 << 20)
    free = shutil.disk_usage(path.parent).free
    if free >= need and not failed:
        return None
    return (f"not enough disk space to save checkpoint {path}: it needs {need / 2**20:.0f} MiB free in "
            f"{path.parent}, {free / 2**20:.0f} MiB are; free {max(need - free, 0) / 2**20:.0f} MiB there (the previous "
            f"checkpoints are untouched), or move exp_manager.exp_dir to a larger disk")
