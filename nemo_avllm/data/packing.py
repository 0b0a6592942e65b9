"""Sequence packing: the samples of one data-parallel rank's share of a global batch fill rows of
`seq_length` tokens, so the LLM computes (almost) only real tokens.

The MAT sampler still decides *which samples* a global batch holds (counts of samples, exact
resume from `consumed_samples`); packing only decides where they sit. With packing on, the
loader yields one item per optimizer step and rank: a list of packed micro-batches of
`rows_per_micro_batch` rows each (first-fit decreasing, so the count varies with the lengths).

A packed micro-batch keeps the per-sample ("sample layout") tensors the first pipeline stage
needs for the encoders and the embedding (`input_ids [n, L]`, media or cached features, one row
per sample, exactly as unpacked), and adds the packed layout the LLM runs on:

- `pack_index [R, S]`: for every packed position, `sample * L + position` in the sample layout
  (-1: padding). The embedding is computed per sample and gathered into rows by it.
- `labels`, `loss_mask [R, S]`: packed, so the loss is summed over exactly the unpacked tokens.
- `cu_seqlens [k+1]` (int32) over the R*S positions flattened row after row: every sample, and
  every run of padding, is one segment. It is all the later pipeline stages need:
  `PackedRows` derives the position ids (restarting per segment), the block-diagonal causal
  mask (local spec, CPU) and megatron's `PackedSeqParams` (THD, Transformer Engine) from it.
- `pack_shape [2]` = (R, S); `sample_of_token [R, S]` (sample of each position, -1: padding)
  and `item_order [n]` (position of each sample in the collated items): validation groups its
  losses by sample with them.

With pipeline parallelism every micro-batch has the same shape (`fixed_shape`: rows of exactly
`seq_length`, `rows_per_micro_batch` rows, empty rows padded). Without it, the last rows are cut
to their content (rounded up to `LENGTH_MULTIPLE`), so only a few tokens per step are padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_avllm.modality import IGNORE_INDEX

# unpacked sample layouts and cut rows are padded to a multiple of this: tensor/sequence-parallel
# sizes up to 8 divide it, and tensor-core kernels like it
LENGTH_MULTIPLE = 8


@dataclass(frozen=True)
class PackingSpec:
    """How a rank's samples become packed micro-batches (built from the model config)."""

    seq_length: int  # S: tokens per row
    rows_per_micro_batch: int  # R (model.micro_batch_size when packing)
    fixed_shape: bool = False  # pipeline parallelism: every micro-batch exactly [R, S]
    pad_id: int = 0


def make_spec(seq_length: int, micro_batch_size: int, fixed_shape: bool, thd: bool, pad_id: int = 0) -> PackingSpec:
    """The packing of a run. THD (Transformer Engine) attends by `cu_seqlens` alone and needs no
    rows: a micro-batch is one sequence of up to `micro_batch_size * seq_length` tokens, cut to
    its content without pipeline parallelism. The local spec (bshd, block mask) keeps
    `micro_batch_size` rows of `seq_length`."""
    if thd:
        return PackingSpec(int(seq_length) * int(micro_batch_size), 1, bool(fixed_shape), pad_id)
    return PackingSpec(int(seq_length), int(micro_batch_size), bool(fixed_shape), pad_id)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of total length <= `capacity`: the longest first,
    each into the first bin it fits. Deterministic (ties keep index order); within a bin the
    indices are in placement order."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a sample has {n} tokens, more than seq_length={capacity}; tokenize with max_length={capacity}")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def plan_micro_batches(lengths: Sequence[int], spec: PackingSpec) -> list[list[list[int]]]:
    """Micro-batches, each a list of rows, each a list of sample indices."""
    rows = first_fit_decreasing(lengths, spec.seq_length)
    r = spec.rows_per_micro_batch
    return [rows[k:k + r] for k in range(0, len(rows), r)]


def micro_batch_shape(rows: list[list[int]], lengths: Sequence[int], spec: PackingSpec) -> tuple[int, int]:
    """(R, S) of a packed micro-batch: fixed, or cut to its content."""
    if spec.fixed_shape:
        return spec.rows_per_micro_batch, spec.seq_length
    longest = max(sum(int(lengths[i]) for i in row) for row in rows)
    return len(rows), min(spec.seq_length, _round_up(longest, LENGTH_MULTIPLE))


def useful_fraction(lengths: Sequence[int], spec: PackingSpec) -> float:
    """Real tokens / computed token positions when `lengths` are packed by `spec`."""
    total = 0
    for rows in plan_micro_batches(lengths, spec):
        r, s = micro_batch_shape(rows, lengths, spec)
        total += r * s
    return sum(int(n) for n in lengths) / total if total else 0.0


def pack_micro_batch(batch: dict, rows: list[list[int]], lengths: Sequence[int], spec: PackingSpec) -> dict:
    """Add the packed layout (see the module docstring) to a sample-layout micro-batch.

    `batch`: collated samples (`input_ids [n, L]`, shifted `labels [n, L]`); `rows`: sample
    indices (rows of `batch`) per packed row; `lengths[j]`: tokens of sample j. The per-sample
    labels and loss mask are replaced by packed ones."""
    R, S = micro_batch_shape(rows, lengths, spec)
    n, L = batch["input_ids"].shape
    index = torch.full((R, S), -1, dtype=torch.long)
    labels = torch.full((R, S), IGNORE_INDEX, dtype=torch.long)
    owner = torch.full((R, S), -1, dtype=torch.long)
    seg = [0]
    for r in range(R):
        at = 0
        for j in rows[r] if r < len(rows) else []:
            m = int(lengths[j])
            index[r, at:at + m] = j * L + torch.arange(m)
            labels[r, at:at + m] = batch["labels"][j, :m]
            owner[r, at:at + m] = j
            at += m
            seg.append(r * S + at)
        if at < S:  # the row's padding is a segment of its own
            seg.append((r + 1) * S)
    batch = dict(batch)
    batch.update(pack_index=index, labels=labels, loss_mask=labels != IGNORE_INDEX, sample_of_token=owner,
                 cu_seqlens=torch.tensor(seg, dtype=torch.int32), pack_shape=torch.tensor([R, S]))
    return batch


def collate_packed(items: list, spec: PackingSpec, collate) -> list[dict]:
    """A rank's items of one step -> packed micro-batches. `collate(items, pad_to)` builds the
    sample layout (`collate.collate_av`); None items (evaluation, bad media) are dropped."""
    items = [it for it in items if it is not None]
    if not items:
        raise ValueError("collate_packed: every item of the batch was None (all media bad)")
    lengths = [len(it["tokens"].input_ids) for it in items]
    out = []
    for rows in plan_micro_batches(lengths, spec):
        order = [i for row in rows for i in row]
        mine = [lengths[i] for i in order]
        batch = collate([items[i] for i in order], _round_up(max(mine), LENGTH_MULTIPLE))
        pos = {i: k for k, i in enumerate(order)}
        packed = pack_micro_batch(batch, [[pos[i] for i in row] for row in rows], mine, spec)
        packed["item_order"] = torch.tensor(order)
        out.append(packed)
    return out


def balance_ranks(ranks: list[list], lengths: list[list[int]]) -> list[list]:
    """One global batch re-dealt over the data-parallel ranks so that their token counts, not
    only their sample counts, are balanced. Every rank keeps its number of samples (they are
    equal): the samples, longest first, are dealt in rounds of one per rank, each round's
    longest to the rank with the fewest tokens so far (ties: lower rank). Each rank's samples
    keep their order in the batch. The batch's items (so its MAT counts) do not change, and the
    result is a pure function of the items and their lengths."""
    dp, per = len(ranks), len(ranks[0]) if ranks else 0
    if any(len(r) != per for r in ranks):
        raise ValueError(f"balance_ranks: ranks hold {[len(r) for r in ranks]} samples; expected equal shares")
    flat = [(n, pos, item) for pos, (item, n) in enumerate(
        (it, n) for r, ls in zip(ranks, lengths) for it, n in zip(r, ls))]
    flat.sort(key=lambda x: (-x[0], x[1]))
    load = [0] * dp
    out: list[list] = [[] for _ in ranks]
    for k in range(0, len(flat), dp):
        lightest = sorted(range(dp), key=lambda r: (load[r], r))
        for r, (n, pos, item) in zip(lightest, flat[k:k + dp]):
            out[r].append((pos, item))
            load[r] += n
    return [[item for _, item in sorted(r, key=lambda x: x[0])] for r in out]


def token_balanced(sampler_cls):
    """`sampler_cls` (a `MATBatchSampler`) whose `rank_batches` deals each global batch with
    `balance_ranks`; `length_of(item)` gives an item's token count."""

    class TokenBalanced(sampler_cls):
        def __init__(self, *args, length_of, **kwargs):
            self.length_of = length_of
            super().__init__(*args, **kwargs)

        def rank_batches(self, step: int):
            ranks = super().rank_batches(step)
            return balance_ranks(ranks, [[self.length_of(it) for it in r] for r in ranks])

    TokenBalanced.__name__ = f"TokenBalanced{sampler_cls.__name__}"
    return TokenBalanced


class PackedRows:
    """The packed layout of a micro-batch as the model uses it, from `cu_seqlens` and
    `pack_shape` (every pipeline stage) and `pack_index` (first stage)."""

    def __init__(self, cu_seqlens: torch.Tensor, shape, index: torch.Tensor | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.rows, self.length = (int(x) for x in shape)
        self.index = index

    @classmethod
    def from_batch(cls, batch: dict) -> "PackedRows | None":
        if batch.get("cu_seqlens") is None:
            return None
        return cls(batch["cu_seqlens"], batch["pack_shape"].tolist(), batch.get("pack_index"))

    def _segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment number, position within the segment) of every flattened position."""
        cu = self.cu_seqlens.long()
        flat = torch.arange(self.rows * self.length, device=cu.device)
        seg = torch.searchsorted(cu, flat, right=True) - 1
        return seg, flat - cu[seg]

    def position_ids(self) -> torch.Tensor:
        """[R, S]: positions restart at 0 for every sample."""
        return self._segments()[1].view(self.rows, self.length)

    def attention_mask(self) -> torch.Tensor:
        """[R, 1, S, S] bool, True = may not attend: causal and inside one sample (the local
        spec's DotProductAttention applies it before its softmax)."""
        seg = self._segments()[0].view(self.rows, self.length)
        other = seg.unsqueeze(2) != seg.unsqueeze(1)
        future = torch.ones(self.length, self.length, dtype=torch.bool, device=seg.device).triu(1)
        return (other | future).unsqueeze(1)

    def packed_seq_params(self):
        """megatron's THD parameters (Transformer Engine attention, RoPE restarting per segment)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=longest, max_seqlen_kv=longest)

    def pack(self, emb: torch.Tensor) -> torch.Tensor:
        """Sample-layout embeddings [L, n, h] -> packed rows [S, R, h] (zeros on padding)."""
        L, n, h = emb.shape
        flat = emb.transpose(0, 1).reshape(n * L, h)
        idx = self.index.to(flat.device)
        out = flat[idx.clamp(min=0).view(-1)].view(self.rows, self.length, h)
        out = torch.where((idx >= 0).unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.transpose(0, 1).contiguous()


def schedule_shape(seq_length: int, rows: int, thd: bool) -> tuple[int, int]:
    """(seq_length, micro_batch_size) megatron's pipeline schedule exchanges for packed rows:
    THD runs the R rows as one sequence of R*S tokens."""
    return (seq_length * rows, 1) if thd else (seq_length, rows)
