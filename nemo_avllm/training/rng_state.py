"""Every rank's RNG states in a training checkpoint (Python, NumPy, torch CPU/CUDA, megatron's
tracker), one object per (PP, TP) rank as Megatron-LM saves them, so a resumed run draws the same
dropout masks as the uninterrupted one. Restored only at the TP/PP they were saved at: the streams
of other ranks do not exist there."""

from __future__ import annotations

import random

import numpy as np
import torch

from nemo_avllm.training import safe_load

KEY = "rng_state"
LAYOUT_KEY = "rng_layout"  # in the common state: the (TP, PP) the RNG states were saved at


def tp_pp() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}


def get_rng_state() -> dict:
    """This rank's RNG states: Python, NumPy, torch CPU (and CUDA), megatron's RNG tracker."""
    from megatron.core import tensor_parallel

    from nemo_avllm.runtime import distributed

    state = {
        "python": random.getstate(),
        "numpy": safe_load.plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if distributed.has_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    from nemo_avllm.runtime import distributed

    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if distributed.has_gpu() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded(data) -> object:
    """This rank's RNG states as a ShardedObject of shape (PP, TP); DP replicas share them."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        KEY, data,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )
