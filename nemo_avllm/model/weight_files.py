"""Reading weight files without running pickle code: a Hugging Face model folder, a safetensors file
or a torch checkpoint (`weights_only=True`). Used to load the encoders' public checkpoints and to
import a Hugging Face LLaMA.

A Hugging Face model folder holds `model.safetensors`, shards listed by
`model.safetensors.index.json`, or the older `pytorch_model*.bin` (read with `weights_only=True`
and `mmap=True`: no pickle code runs and pages load only when a tensor is used). Tensors are read
one at a time and no file stays mapped, so converting a 7B checkpoint never holds a second copy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

# In order of preference when a folder has several formats.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class HFWeights:
    """The tensors of a Hugging Face model folder, by name, loaded on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder; give a Hugging Face model folder")
        found = [f for f in WEIGHT_FILES if (self.folder / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{self.folder} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
        self.source = found[0]
        if self.source.endswith(".index.json"):
            index = json.loads((self.folder / self.source).read_text())
            if "weight_map" not in index:
                raise ValueError(f"{self.folder / self.source} has no 'weight_map'; it is not a sharded-checkpoint index")
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            shards = sorted(set(self.weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).is_file()]
            if missing:
                lost = [n for n, s in self.weight_map.items() if s in missing]
                raise FileNotFoundError(
                    f"{self.folder}: {self.source} lists {len(shards)} shard files but {len(missing)} are missing: "
                    f"{missing} (they hold {len(lost)} tensors, e.g. {lost[:3]}); download the complete checkpoint"
                )
        else:
            with self._open(self.source) as handle:
                self.weight_map = {name: self.source for name in handle.keys()}  # noqa: SIM118 (safe_open is no dict)

    @contextlib.contextmanager
    def _open(self, file: str):
        """A safetensors handle or a memory-mapped .bin state dict, open only while one tensor is
        read: a kept mapping would leave every page read so far in this process's RSS."""
        path = self.folder / file
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                yield handle
            return
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(sd, dict):
            raise TypeError(f"{path} does not hold a state dict")
        yield sd

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(self._file_of(name)) as handle:
            if isinstance(handle, dict):
                return tuple(handle[name].shape)
            return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of(name)
        with self._open(file) as handle:
            if isinstance(handle, dict):
                if name not in handle:
                    raise KeyError(f"{self.folder / file} does not hold {name!r} although the index says so")
                return handle[name].clone()  # own memory: the mapping closes
            return handle.get_tensor(name)

    def _file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise KeyError(f"{self.folder} ({self.source}) has no tensor {name!r}")
        return self.weight_map[name]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file or of a Hugging Face model folder (small models: encoders)."""
    path = Path(path)
    if path.is_dir():
        weights = HFWeights(path)
        return {name: weights.get(name) for name in weights.weight_map}
    return load_state_dict_file(path)



def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a pickle-free torch checkpoint (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist; set the path or null for random init")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd
