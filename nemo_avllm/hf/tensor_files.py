"""Writing safetensors files, one tensor at a time (reading them: `nemo_avllm.model.weight_files`).

`safetensors.torch.save_file` turns every tensor into bytes before it writes the first
one, i.e. a second copy of the whole model. `write_safetensors` writes the header from declared
shapes first, then each tensor as it is produced: peak memory is the largest single tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec)
DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

def write_safetensors(
    path: str | Path,
    specs: dict[str, tuple[Iterable[int], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor.

    `specs` gives every tensor's shape and dtype (the header comes first in the format);
    `produce(name)` returns the tensor, which is checked against its spec. The file appears under
    its name only when complete."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in DTYPE_CODES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in specs.items():
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}")
            data = t.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
            del t, data
    os.replace(tmp, path)
    return path
