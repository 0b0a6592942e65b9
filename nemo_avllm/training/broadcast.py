"""Data read once per tensor-parallel group, and only by the pipeline stages that use it.

Megatron-LM's `broadcast_data` pattern: the TP ranks of one pipeline stage hold the same replica
of the data, so only TP rank 0 reads the micro-batch (decoding, tokenising) and broadcasts its
tensors to the other TP ranks. The first stage needs the tokens and the media (embedding,
encoders), the last one the labels and loss mask, middle stages nothing: their input arrives from
the previous stage. Media stay on TP rank 0, which runs the frozen encoders for its group
(`AVLLM.encode` broadcasts their outputs). With packed sequences every stage needs the packed
layout (`cu_seqlens`, `pack_shape`: attention in every layer), so every stage reads.
`reads_data()` says whether this rank builds a data loader at all. `step_source` hands out one
optimizer step's micro-batches: the loader's packed list of the step, or one loader item each.
"""

from __future__ import annotations

import torch

FIRST_STAGE_KEYS = ("input_ids", "position_ids", "video", "audio", "features", "pack_index")
ALL_STAGE_KEYS = ("cu_seqlens", "pack_shape")  # packed rows (data.packing.PackedRows)
# media stay on TP rank 0: it runs the frozen encoders and broadcasts their outputs (AVLLM.encode)
SOURCE_ONLY_KEYS = ("video", "audio")
LAST_STAGE_KEYS = ("labels", "loss_mask", "groups")  # groups: validation rows by modality (step.row_groups)
INFO_KEYS = ("ids", "modality", "bad_media")  # small Python lists: counting and logging


def stage_keys(first: bool, last: bool) -> tuple[str, ...]:
    """Batch entries a pipeline stage uses."""
    return (FIRST_STAGE_KEYS if first else ()) + (LAST_STAGE_KEYS if last else ()) + ALL_STAGE_KEYS \
        + (INFO_KEYS if first else ())


def _stage() -> tuple[bool, bool]:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)


def reads_data(packing: bool = False) -> bool:
    """True on the ranks that read micro-batches: TP rank 0 of the first and of the last stage
    (of every stage with `packing`)."""
    from megatron.core import parallel_state as ps

    first, last = _stage()
    return ps.get_tensor_model_parallel_rank() == 0 and (first or last or packing)


def step_source(first_item, fetch, num_microbatches) -> tuple[int, object]:
    """(number of micro-batches, a function returning the next one) for one optimizer step.

    `first_item`: the step's first loader item on the ranks that read (None elsewhere); a
    list is a packed step (`data.packing.collate_packed`: all micro-batches of the step, their
    number set by the data), anything else one micro-batch, `fetch()` giving the others
    (`num_microbatches()` of them in all). The TP ranks that do not read learn the count from TP
    rank 0."""
    from megatron.core import parallel_state as ps

    packed = isinstance(first_item, list)
    count = len(first_item) if packed else None
    if ps.get_tensor_model_parallel_world_size() > 1:
        header = [(packed, count)]
        torch.distributed.broadcast_object_list(header, src=ps.get_tensor_model_parallel_src_rank(),
                                                group=ps.get_tensor_model_parallel_group())
        packed, count = header[0]
        if ps.get_tensor_model_parallel_rank() != 0:
            return (count if packed else num_microbatches()), lambda: None
    if packed:
        return count, iter(first_item).__next__
    pending = [first_item]
    return num_microbatches(), lambda: pending.pop() if pending else fetch()


def _flatten(batch: dict, keys) -> tuple[list, dict, dict]:
    """(tensor specs, tensors by path, other entries) of the entries in `keys`; a dict entry
    (cached `features`) becomes `features/temporal`, ..."""
    specs, tensors, info = [], {}, {}
    for key in keys:
        value = batch.get(key)
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            path = key if sub is None else f"{key}/{sub}"
            if isinstance(v, torch.Tensor):
                specs.append((path, tuple(v.shape), v.dtype))
                tensors[path] = v
            elif v is not None and sub is None:
                info[key] = v
            elif isinstance(value, dict):
                info.setdefault(key, {})  # a dict entry whose members are all None
    return specs, tensors, info


def _unflatten(tensors: dict, info: dict) -> dict:
    out = dict(info)
    for path, t in tensors.items():
        key, _, sub = path.partition("/")
        if sub:
            out.setdefault(key, {})[sub] = t
        else:
            out[key] = t
    return out


def stage_batch(batch: dict | None, device: torch.device | None = None) -> dict:
    """This rank's part of a micro-batch. On TP rank 0, `batch` is the micro-batch it read; on the
    other TP ranks it is ignored (pass None) and the tensors arrive by broadcast. Returns only the
    entries this pipeline stage uses (`stage_keys`), on `device`."""
    from megatron.core import parallel_state as ps

    first, last = _stage()
    keys = stage_keys(first, last)
    if not keys:
        return {}
    tp = ps.get_tensor_model_parallel_world_size()
    src_rank = ps.get_tensor_model_parallel_rank() == 0
    if src_rank and batch is None:
        if first or last:
            raise ValueError("stage_batch: TP rank 0 of a stage that uses data got no micro-batch")
        batch = {}  # a middle stage of an unpacked run: nothing to read
    if tp == 1:
        specs, tensors, info = _flatten(batch, keys)
        return _unflatten({p: t.to(device) if device is not None else t for p, t in tensors.items()}, info)

    group, src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    header, tensors = [None], {}
    if src_rank:
        out = _flatten(batch, [k for k in keys if k in SOURCE_ONLY_KEYS])[1]  # kept here, not sent
        specs, tensors, info = _flatten(batch, [k for k in keys if k not in SOURCE_ONLY_KEYS])
        header = [(specs, info)]  # shapes, dtypes and the small lists
    torch.distributed.broadcast_object_list(header, src=src, group=group, device=device)
    specs, info = header[0]
    out = {p: t.to(device) if device is not None else t for p, t in out.items()} if src_rank else {}
    for path, shape, dtype in specs:
        wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool collectives
        if src_rank:
            t = tensors[path].to(device=device, dtype=wire).contiguous()
        else:
            t = torch.empty(shape, dtype=wire, device=device)
        torch.distributed.broadcast(t, src=src, group=group)
        out[path] = t.to(dtype)
    return _unflatten(out, info)
