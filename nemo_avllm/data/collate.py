"""Items -> a model batch, in one place: tokens (next-token labels, loss mask, padding to a fixed
length), the media or cached features beside them, and the packed layout when packing is on.

Position i of `input_ids` predicts token i+1, so labels are the tokenised labels shifted left by
one. A fixed `seq_length` keeps every micro-batch the same shape, which pipeline parallelism
needs for its point-to-point transfers."""

from __future__ import annotations

from functools import partial

import torch

from nemo_avllm.data.packing import PackingSpec, collate_packed, make_spec
from nemo_avllm.modality import IGNORE_INDEX

FEATURE_KINDS = ("temporal", "spatial", "audio")


def collate_tokens(samples, seq_length: int | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """`samples`: objects with `input_ids` and `labels` lists (see conversation.TokenizedSample)."""
    longest = max(len(s.input_ids) for s in samples)
    n = seq_length or longest
    if longest > n:
        raise ValueError(f"a sample has {longest} tokens, more than seq_length={n}; tokenize with max_length={n}")
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels) - 1] = torch.tensor(s.labels[1:])
    return {"input_ids": ids, "labels": labels, "loss_mask": labels != IGNORE_INDEX}


def stack_rows(rows: list[torch.Tensor | None], device: torch.device | str | None = None) -> torch.Tensor | None:
    """Stack per-sample tensors, zeros for samples without one; None if no sample has one.

    Rows can come from different decoders (DALI on the GPU for NVDEC codecs, the CPU decoder for
    images): the batch goes to one device, `device` if given, else the accelerator any row is on
    (else the CPU), so CPU and CUDA tensors are never stacked together."""
    present = [r for r in rows if r is not None]
    if not present:
        return None
    if device is None:
        device = next((r.device for r in present if r.device.type != "cpu"), torch.device("cpu"))
    ref = present[0].to(device)
    return torch.stack([r.to(device) if r is not None else torch.zeros_like(ref) for r in rows])


def collate_av(items: list[dict | None], seq_length: int | None = None, pad_id: int = 0) -> dict:
    """Items -> a model batch: tokens via `collate_tokens`; `video [B,T,3,S,S]`, `audio [B,K,W]`
    or `features` {temporal, spatial, audio} (the dict `training.step.forward_step` turns into
    `EncoderFeatures`), with zero rows for samples that don't use a modality (the model picks
    rows by placeholder tokens). None items (replace_bad=False) are dropped."""
    items = [it for it in items if it is not None]
    if not items:
        raise ValueError("collate_av: every item of the batch was None (all media bad)")
    batch = collate_tokens([it["tokens"] for it in items], seq_length, pad_id)
    for key in ("video", "audio"):
        stacked = stack_rows([it.get(key) for it in items])
        if stacked is not None:
            batch[key] = stacked
    if any("features" in it for it in items):
        batch["features"] = {k: stack_rows([it.get("features", {}).get(k) for it in items]) for k in FEATURE_KINDS}
    batch["ids"] = [it["id"] for it in items]
    batch["modality"] = [it["modality"] for it in items]
    batch["bad_media"] = [p for it in items for p in it.get("bad_media", [])]
    return batch


def collate_fn(seq_length: int, pad_id: int, packing: PackingSpec | None = None):
    """The loaders' collate: `collate_av` padded to `seq_length`, or, with `packing`, one step's
    packed micro-batches (`data.packing.collate_packed` over `collate_av`'s sample layout)."""
    if packing is None:
        return partial(collate_av, seq_length=seq_length, pad_id=pad_id)
    return partial(collate_packed, spec=packing, collate=partial(collate_av, pad_id=packing.pad_id))


def packing_spec(seq_length: int, rows: int, fixed_shape: bool, tokenizer, thd: bool = False) -> PackingSpec:
    """`data.packing.make_spec` with the tokenizer's pad id."""
    return make_spec(seq_length, rows, fixed_shape, thd, pad_id_of(tokenizer))


def pad_id_of(tokenizer) -> int:
    """LLaMA tokenizers have no pad token; padding carries no loss, so any id works (0 = <unk>)."""
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
