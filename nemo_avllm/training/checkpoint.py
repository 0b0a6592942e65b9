"""megatron-core `dist_checkpointing` checkpoints: model, optimizer and the run's common state.

A checkpoint is a folder. Tensors are saved as sharded tensors, so a run saved at TP=2/PP=1 loads
at TP=1/PP=2 (resharding is dist_checkpointing's job); everything that is not a tensor shard
(scheduler, sampler, Lightning loop state) goes into the folder's common state. Saving writes a
sibling `<name>.tmp-<pid>` folder and renames it into place only after every rank finished, so a
kill during a save leaves the previous checkpoint untouched and loadable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from nemo_avllm.model.llm import impl_only_key

COMMON_KEY = "common"


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


def save(path: str | Path, module, optimizer=None, common: dict | None = None) -> Path:
    """Save `module` (a megatron module or megatron DDP), `optimizer` and `common` to `path`."""
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
    state[COMMON_KEY] = common or {}
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


def load(path: str | Path, module, optimizer=None, strict: bool = True) -> dict:
    """Load a checkpoint into `module` (and `optimizer`), resharding to the current TP/PP.
    Returns the common state. `strict=False` loads only the tensors the checkpoint has (e.g. a
    stage-1 checkpoint into stage 2, or LLM weights into a fresh model)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a dist checkpoint folder (no metadata.json); give the folder a run saved, "
            f"e.g. <exp_dir>/<name>/checkpoints/<name>--step=100-last"
        )
    state = {"model": _without_other_impl_state(model_sharded_state_dict(module), path)}
    if not strict:
        saved = {k for k in _saved_keys(path)}
        state["model"] = {k: v for k, v in state["model"].items() if _key_of(v) in saved}
        if not state["model"]:
            raise ValueError(f"checkpoint {path} holds none of this model's tensors")
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True)
    state[COMMON_KEY] = {}
    loaded = dist_checkpointing.load(state, str(path))
    model_sd = loaded["model"]
    if strict:
        missing, unexpected = unwrap(module).load_state_dict(model_sd, strict=False)
        missing = [k for k in missing if not impl_only_key(k)]  # checkpoint of the other layer spec
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    else:
        missing, unexpected = unwrap(module).load_state_dict(model_sd, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint {path}: unexpected tensors {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return loaded.get(COMMON_KEY, {})


def _without_other_impl_state(sharded: dict, path: Path) -> dict:
    """Drop entries only one layer implementation has (TE's `_extra_state`) when the checkpoint
    lacks them: a checkpoint of the local spec loads into TE layers and vice versa."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    if not any(impl_only_key(k) for k in sharded):
        return sharded
    # objects are listed per shard: `<key>/shard_<i>_<n>`
    saved = {k.split("/shard_", 1)[0] for k in load_sharded_metadata(str(path))}
    return {k: v for k, v in sharded.items() if not impl_only_key(k) or _key_of(v) in saved}


def _key_of(sharded) -> str | None:
    return getattr(sharded, "key", None)


def _saved_keys(path: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(path)).keys())


def load_common(path: str | Path) -> dict:
    """Only the common (non-tensor) state of a checkpoint, e.g. its config and step."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path)).get(COMMON_KEY, {})
