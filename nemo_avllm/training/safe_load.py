"""Reading a dist checkpoint never runs code, and a damaged one is reported with its file.

torch.distributed.checkpoint unpickles `.metadata` with plain `pickle` and the checkpoint's objects
(common state, RNG states, layer extra state) with `weights_only=False` torch loads: a folder from
elsewhere (an imported LLM, a stage checkpoint) would be as trusted as code. `install()` makes
every reader in this process safe (megatron's and torch's included): `.metadata` goes through
an unpickler that admits only torch's checkpoint metadata classes, stored objects through
`torch.load(weights_only=True)` (our checkpoints hold only tensors and plain data:
`plain`). `reading(path)` wraps a read: a refused or damaged checkpoint becomes one
`UserError` line naming the file, never a traceback from deep inside torch."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import pickle
import re
from functools import cache
from pathlib import Path

import numpy as np
import torch

from nemo_avllm.errors import UserError

METADATA = ".metadata"
METADATA_JSON = "metadata.json"


class UnsafeCheckpointError(UserError):
    """A checkpoint whose files ask to import or call something other than plain data."""


class DamagedCheckpointError(UserError):
    """A checkpoint with a missing, truncated or unreadable file."""


@cache
def _allowed_globals() -> frozenset[tuple[str, str]]:
    """(module, name) pairs a `.metadata` may name: the dataclasses and enums of torch's checkpoint
    metadata (what `FileSystemWriter` pickles), torch dtypes, `torch.Size` and the layout lookup."""
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    for mod in (metadata, planner, filesystem):
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and obj.__module__ == mod.__name__ and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                allowed.add((mod.__name__, name))
    allowed |= {("torch", n) for n, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.memory_format))}
    return frozenset(allowed)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _allowed_globals():
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused: it asks for {module}.{name}, which is not dist checkpoint metadata; "
            f"a checkpoint is data and this one carries code: do not load it")


def _read_metadata(self, *args, **kwargs):
    """`FileSystemReader.read_metadata` with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        metadata = _load_metadata(f, path)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


class _UnsafeObject(Exception):
    def __init__(self, fqn: str, what: str):
        super().__init__(fqn, what)
        self.fqn, self.what = fqn, what


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """`DefaultLoadPlanner.load_bytes` with `weights_only=True` (megatron's planner inherits it)."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise _UnsafeObject(fqn, m.group(1) if m else str(e).splitlines()[0]) from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


_installed = False


def install() -> None:
    """Make torch's (and so megatron's) dist checkpoint reading safe in this process; idempotent."""
    global _installed
    if _installed:
        return
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
    _installed = True


def _load_metadata(stream, path):
    """Unpickle a `.metadata` stream with the restricted unpickler: raises
    `UnsafeCheckpointError` or `DamagedCheckpointError` naming the file."""
    try:
        return _MetadataUnpickler(stream, path).load()
    except UserError:
        raise
    except Exception as e:  # truncated, emptied, not a pickle
        raise DamagedCheckpointError(f"{path}: damaged ({type(e).__name__}: {e})") from None


def _metadata(path: Path):
    """The `.metadata` of the checkpoint folder `path` (`_load_metadata`)."""
    f = path / METADATA
    try:
        stream = open(f, "rb")
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{f}: missing") from None
    with stream:
        return _load_metadata(stream, f)


@cache
def _admitted(path: Path, stamp: tuple) -> None:
    _metadata(path)


def _storage_file(path: Path, fqn: str) -> str:
    """The data file holding object `fqn`."""
    md = _metadata(path)
    return next((str(path / info.relative_path) for idx, info in md.storage_data.items() if idx.fqn == fqn), str(path))


def damage(path: str | Path) -> str | None:
    """What is wrong with the files of the checkpoint folder `path` (one line naming the file), or
    None: `metadata.json` parses, `.metadata` is admitted and every data file it names exists and
    is long enough. Cheap (no tensor is read); a flipped byte shows only when loading. A
    `.metadata` that asks for code raises `UnsafeCheckpointError`."""
    path = Path(path)
    try:
        json.loads((path / METADATA_JSON).read_text())
    except FileNotFoundError:
        return f"{path / METADATA_JSON}: missing"
    except (ValueError, OSError) as e:
        return f"{path / METADATA_JSON}: damaged ({type(e).__name__}: {e})"
    try:
        md = _metadata(path)
    except DamagedCheckpointError as e:
        return str(e)
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size < size:
            return f"{f}: truncated ({f.stat().st_size} of at least {size} bytes)"
    return None


def _unwrap(e: BaseException) -> BaseException:
    """The first rank's original exception inside torch's CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        return _unwrap(inner[0] if isinstance(inner, tuple) else inner)
    return e


@contextlib.contextmanager
def reading(path: str | Path):
    """Read the checkpoint at `path` safely: a refused object raises `UnsafeCheckpointError`, any
    failure of a damaged checkpoint `DamagedCheckpointError`, both one line naming the file."""
    from torch.distributed.checkpoint.api import CheckpointException

    install()
    path = Path(path)
    if (path / METADATA).is_file():  # before torch, whose fallbacks log a refusal as tracebacks
        st = (path / METADATA).stat()
        _admitted(path, (st.st_mtime_ns, st.st_size, st.st_ino))
    try:
        yield
    except (Exception, CheckpointException) as e:
        inner = _unwrap(e)
        if isinstance(inner, UserError):
            raise inner.with_traceback(None) from None
        if isinstance(inner, _UnsafeObject):
            raise UnsafeCheckpointError(
                f"{_storage_file(path, inner.fqn)}: refused: object {inner.fqn!r} holds {inner.what}, not tensors "
                f"or plain data; a checkpoint is data and this one may carry code (or was written by an older "
                f"nemo_avllm): do not load it") from None
        where = damage(path)
        if where is None and (isinstance(inner, (OSError, EOFError, pickle.UnpicklingError))
                              or "PytorchStreamReader" in str(inner)):
            where = f"{path}: cannot be read ({type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''})"
        if where is None:
            raise  # not the files' fault
        raise DamagedCheckpointError(f"damaged checkpoint: {where}") from e


def plain(obj):
    """`obj` as tensors and plain Python data, what `torch.load(weights_only=True)` reads back:
    OmegaConf containers as dicts/lists, NumPy arrays as tensors, paths and types as strings."""
    from omegaconf import Container, OmegaConf

    if isinstance(obj, Container):
        return OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return obj


def check_plain(common: dict) -> None:
    """Refuse, at save time, a common state that would not load with `weights_only=True` (rather
    than a checkpoint that fails at resume, hours later)."""
    buf = io.BytesIO()
    torch.save(common, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:
        raise TypeError(f"checkpoint common state is not plain data (convert it with safe_load.plain): "
                        f"{str(e).splitlines()[-1][:300]}") from None
