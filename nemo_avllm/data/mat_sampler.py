"""Modality-Augmented Training (paper §3.3): every global batch mixes visual-only, audio-only and
audio-visual samples in a fixed, configured ratio.

The batch plan is a pure function of (seed, epoch, batch index), so it is deterministic, the same
on every data-parallel rank without communication, and resumable from a consumed-samples count
alone (Megatron's convention; the count also survives a change of the data-parallel size):

- exact per-batch counts per modality by largest-remainder rounding of `ratio * global_batch`;
- per epoch and modality, a stream of that modality's items: permutations of its pool seeded by
  (seed + epoch, modality, pass), concatenated when the modality needs more items than it has
  (oversampling) and cut when it needs fewer;
- per batch, a seeded arrangement of the modality labels over the batch's slots, so each
  data-parallel rank gets a mix rather than one modality;
- rank r takes slots [r*G/dp, (r+1)*G/dp), cut into micro-batches.

An epoch is `len(samples) // global_batch` global batches: derived views do not lengthen it.
Items are `(sample index, view)` tuples, which `AVDataset.__getitem__` accepts.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np

from nemo_avllm.data.manifest import MODALITIES

Item = tuple[int, str]  # (sample index, view)
ALL = "ALL"  # the single stream when no ratios are given (natural proportions)


def normalise_ratios(ratios: dict[str, float], available: dict[str, int]) -> dict[str, float]:
    """Ratios summing to 1 over the modalities that have items. A configured modality without
    items gives its share to the others in proportion to theirs, with a warning."""
    unknown = set(ratios) - set(MODALITIES)
    if unknown:
        raise ValueError(f"data.mat_ratios has unknown modalities {sorted(unknown)}; use {list(MODALITIES)}")
    if any(float(r) < 0 for r in ratios.values()):
        raise ValueError(f"data.mat_ratios must be >= 0, got {dict(ratios)}")
    out = {m: float(ratios.get(m, 0.0)) for m in MODALITIES}
    empty = [m for m in MODALITIES if out[m] > 0 and not available.get(m)]
    if empty:
        warnings.warn(
            f"MAT: no samples of modality {', '.join(empty)} (ratio {', '.join(str(out[m]) for m in empty)}); "
            f"its share goes to the other modalities in proportion", stacklevel=3)
        for m in empty:
            out[m] = 0.0
    total = sum(out.values())
    if total <= 0:
        raise ValueError(
            f"MAT: no samples for any modality with a positive ratio (ratios {dict(ratios)}, items {available}); "
            f"check data.mat_ratios against the manifest's modality tokens")
    unused = [m for m in MODALITIES if available.get(m) and out[m] == 0]
    if unused:
        warnings.warn(f"MAT: {', '.join(f'{available[m]} {m} items' for m in unused)} will never be sampled "
                      f"(ratio 0 in data.mat_ratios)", stacklevel=3)
    return {m: r / total for m, r in out.items() if r > 0}


def largest_remainder(ratios: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, each floor(r*total) or one more; the leftover goes to
    the largest fractional parts (ties: the order of `ratios`)."""
    quotas = {m: r * total for m, r in ratios.items()}
    counts = {m: int(np.floor(q + 1e-9)) for m, q in quotas.items()}
    left = total - sum(counts.values())
    order = sorted(quotas, key=lambda m: -(quotas[m] - counts[m]))  # stable: ties keep given order
    for m in order[:left]:
        counts[m] += 1
    return counts


def batch_slots(counts: dict[str, int], seed: int, epoch: int, batch: int) -> list[str]:
    """Modality label of each position of one global batch, in a seeded random arrangement."""
    labels = [m for m, c in counts.items() for _ in range(c)]
    order = np.random.default_rng([seed, epoch, batch]).permutation(len(labels))
    return [labels[i] for i in order]


def rank_slice(global_batch: int, dp_rank: int, dp_size: int, micro_batch: int) -> tuple[int, int]:
    """[start, end) of a data-parallel rank's part of a global batch (checked divisibility)."""
    if global_batch % (dp_size * micro_batch):
        raise ValueError(
            f"global batch {global_batch} is not a multiple of data-parallel size {dp_size} x micro batch "
            f"{micro_batch}; change model.global_batch_size or model.micro_batch_size")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
    per_rank = global_batch // dp_size
    return dp_rank * per_rank, (dp_rank + 1) * per_rank


def stream_order(pool_size: int, needed: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """Positions into a pool for one epoch: seeded permutations of the pool, concatenated (a
    modality that needs more items than it has) and cut to `needed`."""
    parts, have, k = [], 0, 0
    while have < needed:
        parts.append(np.random.default_rng([seed + epoch, stream, k]).permutation(pool_size))
        have += pool_size
        k += 1
    return np.concatenate(parts)[:needed] if parts else np.zeros(0, dtype=np.int64)


class MATBatchSampler:
    """Micro-batches of `(sample index, view)` items for one data-parallel rank.

    `samples`: validated manifest samples (anything with `available_views(derive)` and
    `modality`). `ratios`: e.g. {"V": 0.5, "A": 0.2, "AV": 0.3}; None trains on the samples as
    they come (no MAT, natural proportions). `derive_views`: audio-visual samples also yield V and
    A views. Use as a DataLoader `batch_sampler`; each `iter()` runs to the end of the current
    epoch, the next one starts the next epoch."""

    def __init__(
        self,
        samples: Sequence,
        ratios: dict[str, float] | None,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        derive_views: bool = False,
        consumed_samples: int = 0,
    ):
        if not samples:
            raise ValueError("MAT sampler: no samples (the manifest validated to nothing?)")
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.start, self.end = rank_slice(self.global_batch_size, self.dp_rank, self.dp_size, self.micro_batch_size)
        self.seed = int(seed)
        self.derive_views = bool(derive_views)
        if ratios is None:
            self.pools: dict[str, list[Item]] = {ALL: [(i, s.modality) for i, s in enumerate(samples)]}
            self.ratios = {ALL: 1.0}
        else:
            pools: dict[str, list[Item]] = {m: [] for m in MODALITIES}
            for i, s in enumerate(samples):
                for view in s.available_views(self.derive_views):
                    pools[view].append((i, view))
            self.ratios = normalise_ratios(dict(ratios), {m: len(p) for m, p in pools.items()})
            self.pools = {m: pools[m] for m in self.ratios}
        self.counts = largest_remainder(self.ratios, self.global_batch_size)
        self.batches_per_epoch = max(1, len(samples) // self.global_batch_size)
        self.consumed_samples = 0
        self._epoch_cache: tuple[int, dict[str, np.ndarray]] | None = None
        self.set_consumed_samples(consumed_samples)

    # -- position ----------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.global_batch_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def set_consumed_samples(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or consumed_samples % self.global_batch_size:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a multiple of the global batch {self.global_batch_size}; "
                f"resume from a checkpoint written with the same model.global_batch_size")
        self.consumed_samples = int(consumed_samples)

    def state_dict(self, consumed_samples: int | None = None) -> dict:
        """{consumed_samples, epoch} for the checkpoint. A DataLoader prefetches, so the trainer
        should pass its own count (iteration * global batch) rather than rely on the sampler's."""
        n = self.consumed_samples if consumed_samples is None else int(consumed_samples)
        return {"consumed_samples": n, "epoch": n // self.samples_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.set_consumed_samples(int(state["consumed_samples"]))

    # -- plan --------------------------------------------------------------------------------
    def _streams(self, epoch: int) -> dict[str, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            streams = {}
            for k, (m, count) in enumerate(self.counts.items()):
                order = stream_order(len(self.pools[m]), count * self.batches_per_epoch, self.seed, epoch,
                                     MODALITIES.index(m) if m in MODALITIES else k)
                streams[m] = order
            self._epoch_cache = (epoch, streams)
        return self._epoch_cache[1]

    def global_batch(self, epoch: int, batch: int) -> list[Item]:
        """The whole global batch `batch` of `epoch` (what all ranks together train on)."""
        streams = self._streams(epoch)
        taken = dict.fromkeys(self.counts, 0)
        out = []
        for m in batch_slots(self.counts, self.seed, epoch, batch):
            pos = streams[m][batch * self.counts[m] + taken[m]]
            taken[m] += 1
            out.append(self.pools[m][pos])
        return out

    def __iter__(self) -> Iterator[list[Item]]:
        epoch = self.epoch
        first = (self.consumed_samples % self.samples_per_epoch) // self.global_batch_size
        mbs = self.micro_batch_size
        for b in range(first, self.batches_per_epoch):
            mine = self.global_batch(epoch, b)[self.start : self.end]
            micro = [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
            for k, mb in enumerate(micro):
                if k == len(micro) - 1:
                    self.consumed_samples += self.global_batch_size
                yield mb

    def __len__(self) -> int:
        """Micro-batches left in the current epoch for this rank."""
        left = self.batches_per_epoch - (self.consumed_samples % self.samples_per_epoch) // self.global_batch_size
        return left * (self.end - self.start) // self.micro_batch_size
