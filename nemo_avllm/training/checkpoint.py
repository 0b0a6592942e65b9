"""megatron-core `dist_checkpointing` checkpoints: model, optimizer and the run's common state.

A checkpoint is a folder. Tensors are saved as sharded tensors, so a run saved at TP=2/PP=1 loads
at TP=1/PP=2 (resharding is dist_checkpointing's job); everything that is not a tensor shard
(scheduler, sampler, Lightning loop state) goes into the folder's common state. Saving writes a
sibling `<name>.tmp-<pid>` folder and renames it into place only after every rank finished, so a
kill during a save leaves the previous checkpoint untouched and loadable.

Training checkpoints also hold every rank's RNG states (Python, NumPy, torch CPU/CUDA, megatron's
tracker), one object per (PP, TP) rank as Megatron-LM saves them, so a resumed run draws the same
dropout masks as the uninterrupted one. They are restored only at the TP/PP they were saved at
(the streams of other ranks do not exist there)."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

COMMON_KEY = "common"
RNG_KEY = "rng_state"
RNG_LAYOUT_KEY = "rng_layout"  # in the common state: the (TP, PP) the RNG states were saved at


def _sync_writer_queue() -> None:
    """dist_checkpointing's writer keeps a multiprocessing queue; make it with `fork` so saving
    does not spawn a fresh interpreter that re-imports the caller's __main__."""
    if os.name == "posix":
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async.get_write_results_queue("fork")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def unwrap(module):
    """The AVLLM inside megatron DDP: checkpoints name tensors without the wrapper's prefix."""
    while hasattr(module, "module") and not hasattr(module, "llm"):
        module = module.module
    return module


def model_sharded_state_dict(module) -> dict:
    return unwrap(module).sharded_state_dict(prefix="")


def _tp_pp() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}


def get_rng_state() -> dict:
    """This rank's RNG states: Python, NumPy, torch CPU (and CUDA), megatron's RNG tracker."""
    from megatron.core import tensor_parallel

    from nemo_avllm.runtime import distributed

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
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
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if distributed.has_gpu() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data) -> object:
    """This rank's RNG states as a ShardedObject of shape (PP, TP); DP replicas share them."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        RNG_KEY, data,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def save(path: str | Path, module, optimizer=None, common: dict | None = None, rng: bool = False) -> Path:
    """Save `module` (a megatron module or megatron DDP), `optimizer` and `common` to `path`;
    `rng=True` (training checkpoints) adds this rank's RNG states."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    # the same temporary name on every rank: rank 0 picks it and broadcasts it
    tmp = [str(path.parent / f"{path.name}.tmp-{os.getpid()}")]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(tmp, src=0)
    tmp = Path(tmp[0])
    if _rank() == 0:
        # leftovers of saves that were killed midway are never valid checkpoints
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in path.parent.glob(f"{path.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": model_sharded_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"])
    state[COMMON_KEY] = dict(common or {})
    if rng:
        state[RNG_KEY] = _rng_sharded(get_rng_state())
        state[COMMON_KEY][RNG_LAYOUT_KEY] = _tp_pp()
    _sync_writer_queue()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        if path.exists():
            old = path.parent / f"{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    _barrier()
    return path


def recover_interrupted_saves(checkpoint_dir: str | Path) -> list[Path]:
    """Put back checkpoints whose replacement was killed between its two renames
    (`X` moved to `X.old-PID`, new `X` not yet in place). Returns the recovered paths."""
    recovered = []
    for old in Path(checkpoint_dir).glob("*.old-*"):
        target = old.with_name(old.name.rsplit(".old-", 1)[0])
        if not target.exists() and is_checkpoint(old):
            try:
                old.rename(target)
                recovered.append(target)
            except OSError:  # another rank got there first
                pass
    return recovered


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "metadata.json").is_file()


def load(path: str | Path, module, optimizer=None, strict: bool = True, rng: bool = False) -> dict:
    """Load a checkpoint into `module` (and `optimizer`), resharding to the current TP/PP.
    Returns the common state. `strict=False` loads only the tensors the checkpoint has (e.g. a
    stage-1 checkpoint into stage 2, or LLM weights into a fresh model). `rng=True` (resuming a
    run) restores the RNG states when the checkpoint has them for this TP/PP."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a dist checkpoint folder (no metadata.json); give the folder a run saved, "
            f"e.g. <exp_dir>/<name>/checkpoints/<name>--step=100-last"
        )
    state = {"model": model_sharded_state_dict(module)}
    if not strict:
        saved = {k for k in _saved_keys(path)}
        state["model"] = {k: v for k, v in state["model"].items() if _key_of(v) in saved}
        if not state["model"]:
            raise ValueError(f"checkpoint {path} holds none of this model's tensors")
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True)
    state[COMMON_KEY] = {}
    if rng:
        saved_at = load_common(path).get(RNG_LAYOUT_KEY)
        if saved_at == _tp_pp():
            state[RNG_KEY] = _rng_sharded(None)
        else:
            rng = False
            log.warning("%s: RNG states %s; dropout draws will differ from the interrupted run's", path,
                        f"saved at {saved_at}, not restored at {_tp_pp()}" if saved_at else "not in the checkpoint")
    loaded = dist_checkpointing.load(state, str(path))
    model_sd = loaded["model"]
    if strict:
        unwrap(module).load_state_dict(model_sd, strict=True)
    else:
        missing, unexpected = unwrap(module).load_state_dict(model_sd, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint {path}: unexpected tensors {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if rng:
        set_rng_state(loaded[RNG_KEY])
    return loaded.get(COMMON_KEY, {})


def _key_of(sharded) -> str | None:
    return getattr(sharded, "key", None)


def _saved_keys(path: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(path)).keys())


def load_common(path: str | Path) -> dict:
    """Only the common (non-tensor) state of a checkpoint, e.g. its config and step."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path)).get(COMMON_KEY, {})
