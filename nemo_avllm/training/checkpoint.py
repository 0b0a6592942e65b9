"""megatron-core `dist_checkpointing` checkpoints: model, optimizer and the run's common state.

A checkpoint is a folder. Tensors are saved as sharded tensors, so a run saved at TP=2/PP=1 loads
at TP=1/PP=2 (resharding is dist_checkpointing's job); everything that is not a tensor shard
(scheduler, sampler, Lightning loop state) goes into the folder's common state. Saving writes a
sibling `<name>.tmp-<pid>` folder and renames it into place only after every rank finished, so a
kill during a save leaves the previous checkpoint untouched and loadable.

Training checkpoints also hold every rank's RNG states (`rng_state`). A save first checks that
it fits on disk (`checkpoint_space`).

Reading one never runs code (`safe_load`): every read here goes through `safe_load.reading`, and
what a save stores besides tensors is plain data (`safe_load.plain`), so it loads with `weights_only=True`."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from nemo_avllm.errors import UserError
from nemo_avllm.model.llm import impl_only_key
from nemo_avllm.runtime.processes import process_gone
from nemo_avllm.training import rng_state, safe_load
from nemo_avllm.training.checkpoint_space import DiskFullError, bytes_to_write, space_shortfall

log = logging.getLogger(__name__)

COMMON_KEY = "common"
# What an LLM-only checkpoint (`avllm import-hf`) lacks of an AVLLM: `load(..., allow_missing=)`.
NOT_IN_LLM_CHECKPOINT = ("proj_", "vision.", "audio.")
# The distributed optimizer's state as each data-parallel rank's own bucket shards (Megatron-LM's
# default): written and read in parallel, nothing gathered on one rank; it reshards over DP sizes.
# megatron-core 0.19's own default (`fully_sharded_model_space`) cannot be saved at all.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


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


def save(path: str | Path, module, optimizer=None, common: dict | None = None, rng: bool = False) -> Path:
    """Save `module` (a megatron module or megatron DDP), `optimizer` and `common` to `path`;
    `rng=True` (training checkpoints) adds this rank's RNG states."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = {"model": model_sharded_state_dict(module)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=OPTIMIZER_METADATA)
    # the same temporary name on every rank: rank 0 picks it and broadcasts it, with the verdict
    # of the free-space check (every rank raises it, none is left waiting in a barrier)
    tmp = [str(path.parent / f"{path.name}.tmp-{_owner_tag()}"), None]
    need = bytes_to_write(state)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp[1] = space_shortfall(path, need)
        # leftovers of this checkpoint's saves that were killed midway, only those whose owner is gone
        for stale in [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]:
            if _owner_gone(stale):
                shutil.rmtree(stale, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(tmp, src=0)
    if tmp[1]:
        raise DiskFullError(tmp[1])
    tmp = Path(tmp[0])
    if _rank() == 0:
        tmp.mkdir(parents=True)
    _barrier()
    state[COMMON_KEY] = safe_load.plain(dict(common or {}))
    if rng:
        state[rng_state.KEY] = rng_state.sharded(rng_state.get_rng_state())
        state[COMMON_KEY][rng_state.LAYOUT_KEY] = rng_state.tp_pp()
    if _rank() == 0:
        safe_load.check_plain(state[COMMON_KEY])
    _sync_writer_queue()
    try:
        dist_checkpointing.save(state, str(tmp))
    except BaseException as e:  # torch's CheckpointException ("Worker failure") is a BaseException
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        short = space_shortfall(path, need, failed="No space left on device" in f"{e}{e!r}{e.__cause__!r}")
        if short:
            raise DiskFullError(short) from e
        raise
    _barrier()
    if _rank() == 0:
        if path.exists():
            old = path.parent / f"{path.name}.old-{_owner_tag()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    _barrier()
    return path


def _owner_tag() -> str:
    """`<pid>-<host>`: whose temporary folder this is (only its owner removes it while it lives)."""
    import socket

    return f"{os.getpid()}-{socket.gethostname()}"


def _owner_gone(leftover: Path) -> bool:
    tag = re.split(r"\.(?:tmp|old)-", leftover.name)[-1]
    pid, _, host = tag.partition("-")
    return pid.isdigit() and bool(host) and process_gone(int(pid), host)


def failed_saves(checkpoint_dir: str | Path) -> list[Path]:
    """Leftovers of saves that did not finish (`*.tmp-*`, `*.old-*` after
    `recover_interrupted_saves`): never valid checkpoints. Only the run folder's lock holder may
    remove them all (nobody else saves there)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    # NeMo's `<name>-unfinished` marker of a save that failed before its folder was in place
    markers = [m for m in d.glob("*-unfinished") if not m.with_name(m.name[: -len("-unfinished")]).exists()]
    return sorted([*d.glob("*.tmp-*"), *d.glob("*.old-*"), *markers])


def step_of(path: Path) -> int:
    m = re.search(r"step[=_](\d+)", path.name)  # step_N (now) or step=N (older runs)
    return int(m.group(1)) if m else -1


def candidates(checkpoint_dir: str | Path) -> list[Path]:
    """A run's checkpoint folders (final names only, damaged ones included)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return [p for p in d.iterdir() if p.is_dir() and step_of(p) >= 0 and not re.search(r"\.(tmp|old)-|\.damaged$", p.name)]


def newest_intact(paths) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest (by step, then `*-last`, then mtime) of `paths` whose files are whole and whose
    common state loads, and the damaged ones newer than it, each with the reason naming its file."""
    damaged = []
    for p in sorted(paths, key=lambda p: (step_of(p), p.name.endswith("-last"), p.stat().st_mtime), reverse=True):
        try:
            why = safe_load.damage(p)
            if why is None:
                load_common(p)
                return p, damaged
        except UserError as e:
            why = str(e)
        damaged.append((p, why))
    return None, damaged


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


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (`<exp_dir>/<name>`, or its `checkpoints/`) meaning its
    newest `*-last` checkpoint: what a job submitted before the previous stage ran can name."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    lasts = [p for d in (path / "checkpoints", path) for p in d.glob("*-last") if p.is_dir()]
    chosen, damaged = newest_intact(lasts)
    for p, why in damaged:
        log.warning("checkpoint %s is damaged and not used: %s", p, why)
    return chosen or path


class CheckpointMismatchError(UserError):
    """A checkpoint that lacks tensors the model needs (or holds ones it cannot take)."""


def missing_tensors(path: str | Path, module, sharded: dict | None = None) -> list[str]:
    """Names of `module`'s tensors (at this rank's TP/PP) that the checkpoint at `path` lacks;
    objects (layer `_extra_state`) are not tensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    saved = _saved_keys(path)
    sharded = model_sharded_state_dict(module) if sharded is None else sharded
    return sorted(name for name, v in sharded.items() if not isinstance(v, ShardedObject) and _key_of(v) not in saved)


def load(path: str | Path, module, optimizer=None, allow_missing: tuple[str, ...] = (), rng: bool = False) -> dict:
    """Load a checkpoint (or a run folder's last one, see `resolve`) into `module` (and
    `optimizer`), resharding to the current TP/PP. Returns the common state. `rng=True` (resuming
    a run) restores the RNG states when the checkpoint has them for this TP/PP.

    Strict: every tensor of `module` must be in the checkpoint, except those whose names start
    with one of `allow_missing` (the caller says what may legitimately be absent, e.g. the new
    projectors when an imported LLM starts stage 1: `training.restore`); those keep their
    current values. Tensors the checkpoint has and `module` lacks are not read (a model built
    without encoders restores from a run that had them). `optimizer=None` restores weights only:
    the checkpoint's optimizer state is not read."""
    if optimizer is None:
        return _load(path, module, None, allow_missing, rng)
    from nemo_avllm.training.optim import loading_state

    with loading_state(optimizer):
        return _load(path, module, optimizer, allow_missing, rng)


def _load(path, module, optimizer, allow_missing, rng) -> dict:
    from megatron.core import dist_checkpointing

    path = resolve(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a dist checkpoint folder (no metadata.json) nor a run folder with a "
            f"*-last checkpoint; give the folder a run saved, e.g. <exp_dir>/<name>/checkpoints/"
            f"<name>--step_100-last, or the run folder <exp_dir>/<name>"
        )
    state = {"model": _without_other_impl_state(model_sharded_state_dict(module), path)}
    saved = _saved_keys(path)
    refused = [n for n in missing_tensors(path, module, state["model"]) if not n.startswith(tuple(allow_missing))]
    if refused:
        raise CheckpointMismatchError(
            f"checkpoint {path} lacks {len(refused)} tensors of this model: "
            f"{', '.join(refused[:6])}{' ...' if len(refused) > 6 else ''}. It was saved for another model "
            f"config (model.llm.*, encoders, TP/PP-independent names) or is incomplete; restore from a "
            f"checkpoint of this model (model.restore_from / the run's last checkpoint)"
        )
    state["model"] = {k: v for k, v in state["model"].items() if _key_of(v) in saved}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True, metadata=OPTIMIZER_METADATA)
    state[COMMON_KEY] = {}
    if rng:
        saved_at = load_common(path).get(rng_state.LAYOUT_KEY)
        if saved_at == rng_state.tp_pp():
            state[rng_state.KEY] = rng_state.sharded(None)
        else:
            rng = False
            log.warning("%s: RNG states %s; dropout draws will differ from the interrupted run's", path,
                        f"saved at {saved_at}, not restored at {rng_state.tp_pp()}" if saved_at else "not in the checkpoint")
    loaded = read_tensors(path, state)
    _, unexpected = unwrap(module).load_state_dict(loaded["model"], strict=False)
    if unexpected:
        raise CheckpointMismatchError(f"checkpoint {path}: unexpected tensors {unexpected[:5]}")
    if optimizer is not None:
        # no_grad: with fp32 params the distributed optimizer's main params are views of the
        # model's leaf parameters, which megatron copies into in place
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    if rng:
        rng_state.set_rng_state(loaded[rng_state.KEY])
    return loaded.get(COMMON_KEY, {})


def saved_parts(path: str | Path) -> set[str]:
    """Top-level parts of the model the checkpoint holds tensors of: `llm`, `proj_temporal`,
    `vision`, ... (checkpoint keys start with the AVLLM attribute names)."""
    return {k.split(".", 1)[0] for k in _saved_keys(Path(path))}


def _without_other_impl_state(sharded: dict, path: Path) -> dict:
    """Drop entries only one layer implementation has (TE's `_extra_state`) when the checkpoint
    lacks them: a checkpoint of the local spec loads into TE layers and vice versa."""
    if not any(impl_only_key(k) for k in sharded):
        return sharded
    saved = _saved_keys(path)
    return {k: v for k, v in sharded.items() if not impl_only_key(k) or _key_of(v) in saved}


def _key_of(sharded) -> str | None:
    return getattr(sharded, "key", None)


def _saved_keys(path: Path) -> set[str]:
    """Keys of the checkpoint's tensors and objects (objects are listed per shard:
    `<key>/shard_<i>_<n>`; here by their key)."""
    from megatron.core import dist_checkpointing

    with safe_load.reading(path):
        return {k.split("/shard_")[0] for k in dist_checkpointing.serialization.load_sharded_metadata(str(path))}


def tensor_keys(path: str | Path) -> set[str]:
    """Keys of the checkpoint's tensors (not objects)."""
    from megatron.core import dist_checkpointing

    with safe_load.reading(path):
        return set(dist_checkpointing.load_tensors_metadata(str(path)))


def read_tensors(path: str | Path, sharded: dict) -> dict:
    """`dist_checkpointing.load` of the sharded state dict `sharded` (the export's reader)."""
    from megatron.core import dist_checkpointing

    with safe_load.reading(path):
        return dist_checkpointing.load(sharded, str(path))


def load_common(path: str | Path) -> dict:
    """Only the common (non-tensor) state of a checkpoint, e.g. its config and step."""
    from megatron.core import dist_checkpointing

    with safe_load.reading(path):
        return dist_checkpointing.load_common_state_dict(str(path)).get(COMMON_KEY, {})


def model_config(path: str | Path):
    """The model config saved in a checkpoint's common state (an OmegaConf DictConfig), for
    loading it outside training (generation, export)."""
    from omegaconf import OmegaConf

    from nemo_avllm.config import to_dict

    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a dist checkpoint folder (no metadata.json)")
    cfg = load_common(path).get("cfg")
    if not cfg:
        raise ValueError(f"{path} has no model config in its common state; it was not written by nemo_avllm")
    return OmegaConf.create(to_dict(cfg))
