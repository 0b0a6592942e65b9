"""Samples -> a model batch: next-token labels, loss mask, padding to a fixed length.

Position i of `input_ids` predicts token i+1, so labels are the tokenised labels shifted left by
one. A fixed `seq_length` keeps every micro-batch the same shape, which pipeline parallelism
needs for its point-to-point transfers."""

from __future__ import annotations

import torch

from nemo_avllm.modality import IGNORE_INDEX


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
