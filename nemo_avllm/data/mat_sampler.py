"""Modality-Augmented Training (paper §3.3) and the Table 5 training strategies as a batch plan.

Which modalities each global batch holds is a `ModalityPlan`, a pure function of the global step
(so it is deterministic, the same on every data-parallel rank without communication, and resumable
from a consumed-samples count alone, Megatron's convention), for one of three schedules
(`model.data.modality_schedule`, paper §4.4):

- `mat` (default): every global batch holds V, A and AV items in the exact counts of
  `mat_ratios * global_batch` (largest-remainder rounding);
- `pt1`: the first `modality_schedule_split` of the run's steps are audio-visual batches (AV only),
  the rest are single-modality batches, V or A, alternating so that the running share of V
  batches tracks V / (V + A) of `mat_ratios` (batch t of the phase is V iff
  round((t+1)·q) > round(t·q), q that share);
- `pt2`: those two phases in the other order (V or A batches first, then AV).

Per modality, the items come from one endless stream: seeded permutations of its pool,
`(seed, modality, pass)`, one after the other (every item once before any repeats). A global
batch takes the next `count` items of each of its modalities. When a batch straddles two passes,
the new pass's first items are swapped away from the ones the old pass gave that batch, so no item
`(sample, view)` appears twice in a global batch (a pool smaller than one batch's share is refused).

The labels of a global batch are dealt over the data-parallel ranks modality by modality, so
each rank holds its share of each modality within ±1; each rank's slots are then shuffled
(seeded by (seed, step)) and cut into micro-batches. An epoch is `len(samples) // global_batch`
global batches (views do not lengthen it); it only frames DataLoader iteration. Items are
`(sample index, view)` tuples, which `AVDataset.__getitem__` accepts; `shards.ShardStream`
follows the same plan over webdataset streams.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np

from nemo_avllm.data.manifest import MODALITIES
from nemo_avllm.errors import UserError

Item = tuple[int, str]  # (sample index, view)
ALL = "ALL"  # the single stream when no ratios are given (natural proportions)
SCHEDULES = ("mat", "pt1", "pt2")
# The schedule and pt1/pt2 split a run gets when `model.data` names none (the one place they are written).
DEFAULT_SCHEDULE, DEFAULT_SPLIT = "mat", 0.5
TOGETHER, SEPARATE = (("AV",), ("V", "A"))  # the two kinds of phase of pt1/pt2
PHASES = {"mat": None, "pt1": (TOGETHER, SEPARATE), "pt2": (SEPARATE, TOGETHER)}


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


def at_least_one(counts: dict[str, int], ratios: dict[str, float], global_batch: int) -> dict[str, int]:
    """Every modality with a positive ratio gets >= 1 sample per global batch (taken from the
    largest counts): rounding to 0 would silently never train it. Refused when the batch is
    smaller than the number of such modalities."""
    zero = [m for m, c in counts.items() if c == 0 and ratios.get(m, 0) > 0]
    if not zero:
        return counts
    if global_batch < len(counts):
        raise UserError(
            f"MAT: modality {', '.join(zero)} (ratio {', '.join(f'{ratios[m]:.3g}' for m in zero)}) rounds to 0 "
            f"samples in a global batch of {global_batch} and would never train; raise model.global_batch_size to "
            f">= {len(counts)}, or set its ratio in model.data.mat_ratios to 0")
    counts = dict(counts)
    for m in zero:
        counts[max(counts, key=lambda k: counts[k])] -= 1
        counts[m] = 1
    return counts


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


def rank_labels(counts: dict[str, int], seed: int, step: int, dp_size: int) -> list[list[str]]:
    """Modality label of each slot of one global batch, per data-parallel rank: the labels are
    dealt round-robin over the ranks modality after modality (from a seeded first rank), so every
    rank holds floor or ceil of count/dp of each modality, then each rank's slots are shuffled."""
    rng = np.random.default_rng([seed, step])
    first = int(rng.integers(dp_size))
    ranks: list[list[str]] = [[] for _ in range(dp_size)]
    s = first
    for m, c in counts.items():
        for _ in range(c):
            ranks[s % dp_size].append(m)
            s += 1
    return [[r[i] for i in rng.permutation(len(r))] for r in ranks]


def _rounded(t: int, q: float) -> int:
    """round(t*q) with halves up: monotone in t, steps of 0 or 1 (0 <= q <= 1)."""
    return int(np.floor(t * q + 0.5 + 1e-9))


class ModalityPlan:
    """Modality counts of every global step for one schedule (see the module docstring).

    `ratios`: normalised ratios (modality -> share) or {ALL: 1.0}; `max_steps`: the run's
    step count (trainer.max_steps), which `split` divides for pt1/pt2."""

    def __init__(self, ratios: dict[str, float], global_batch: int, schedule: str = DEFAULT_SCHEDULE,
                 split: float = DEFAULT_SPLIT, max_steps: int | None = None):
        if schedule not in SCHEDULES:
            raise UserError(f"model.data.modality_schedule={schedule!r}; use one of {', '.join(SCHEDULES)}")
        self.G, self.schedule, self.ratios = int(global_batch), schedule, dict(ratios)
        self.phases = PHASES[schedule]
        if self.phases is None:
            self.boundary = 0
            self.chunk = at_least_one(largest_remainder(self.ratios, self.G), self.ratios, self.G)
            return
        if not 0.0 <= float(split) <= 1.0:
            raise UserError(f"model.data.modality_schedule_split={split}: give the fraction of the steps in the "
                            f"first phase, between 0 and 1")
        if max_steps is None or int(max_steps) < 1:
            raise UserError(f"model.data.modality_schedule={schedule} splits the run's steps into two phases: "
                            f"set trainer.max_steps (got {max_steps})")
        for phase in self.phases:
            if not any(m in self.ratios for m in phase):
                raise UserError(f"model.data.modality_schedule={schedule} has a {'+'.join(phase)} phase but there are "
                                f"no {' or '.join(phase)} items with a positive ratio in model.data.mat_ratios")
        self.boundary = int(round(float(split) * int(max_steps)))
        sep = [m for m in SEPARATE if m in self.ratios]
        self.q = self.ratios[sep[0]] / sum(self.ratios[m] for m in sep) if sep else 0.0  # share of the first
        self.separate = sep
        self.chunk = {m: self.G for m in MODALITIES if m in self.ratios and any(m in p for p in self.phases)}

    @classmethod
    def build(cls, ratios: dict[str, float] | None, sizes: dict[str, int], global_batch: int,
              schedule: str = DEFAULT_SCHEDULE, split: float = DEFAULT_SPLIT, max_steps: int | None = None) -> "ModalityPlan":
        """The plan for configured `ratios` (None: no MAT, one stream of all samples; with pt1/pt2
        the natural proportions of `sizes`, the items per modality)."""
        if ratios is None and schedule == "mat":
            return cls({ALL: 1.0}, global_batch)
        norm = normalise_ratios(dict(ratios) if ratios is not None else sizes, sizes)
        return cls(norm, global_batch, schedule, split, max_steps)

    @property
    def modalities(self) -> list[str]:
        return list(self.chunk)

    def phase(self, step: int) -> tuple[int, int]:
        """(phase number, step within the phase) of global step `step`."""
        return (0, step) if step < self.boundary else (1, step - self.boundary)

    def _separate_first(self, t: int) -> int:
        """Batches of the first separate modality among the phase's first `t`."""
        return _rounded(t, self.q) if len(self.separate) == 2 else (t if self.separate else 0)

    def counts(self, step: int) -> dict[str, int]:
        """Items per modality in global batch `step`."""
        if self.phases is None:
            return dict(self.chunk)
        p, t = self.phase(step)
        if self.phases[p] == TOGETHER:
            return {"AV": self.G}
        first = self._separate_first(t + 1) > self._separate_first(t)
        return {self.separate[0] if first else self.separate[-1]: self.G}

    def _consumed_in_phase(self, p: int, t: int, m: str) -> int:
        if self.phases[p] == TOGETHER:
            return t * self.G if m == "AV" else 0
        if m not in self.separate:
            return 0
        n_first = self._separate_first(t)
        return self.G * (n_first if m == self.separate[0] else t - n_first)

    def consumed(self, step: int, m: str) -> int:
        """Items of modality `m` used by global batches [0, step)."""
        if self.phases is None:
            return step * self.chunk.get(m, 0)
        before, after = min(step, self.boundary), max(0, step - self.boundary)
        return self._consumed_in_phase(0, before, m) + self._consumed_in_phase(1, after, m)

    def describe(self) -> str:
        """What the schedule does, for the training log."""
        if self.phases is None:
            return f"modality schedule mat: every global batch {self.chunk}"
        names = ["+".join(p) if p == TOGETHER else " or ".join(self.separate) + " batches" for p in self.phases]
        return (f"modality schedule {self.schedule}: steps [0, {self.boundary}) {names[0]}, "
                f"then {names[1]}")


class PoolStream:
    """Endless stream of positions into one modality's pool, taken `chunk` at a time: seeded
    permutations per pass, each pass's head swapped away from the items the previous pass gave
    to the chunk that straddles them. Passes are built in order (a resume replays them: integer
    work only), keeping the last two."""

    def __init__(self, pool_size: int, chunk: int, seed: int, stream: int, name: str = ""):
        if chunk > pool_size:
            raise UserError(
                f"MAT: modality {name} has {pool_size} items but a global batch takes {chunk} of them, so some "
                f"would repeat within a batch; add {name} samples, lower model.global_batch_size, or change "
                f"model.data.mat_ratios / model.data.modality_schedule")
        self.n, self.c, self.seed, self.stream = int(pool_size), int(chunk), int(seed), int(stream)
        self._passes: dict[int, np.ndarray] = {}

    def _raw(self, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, k]).permutation(self.n)

    def _pass(self, k: int) -> np.ndarray:
        if k in self._passes:
            return self._passes[k]
        have = max((i for i in self._passes if i < k), default=-1)
        prev = self._passes.get(have)
        for i in range(have + 1, k + 1):
            perm = self._raw(i)
            j = (i * self.n) % self.c  # items of pass i-1 in the chunk that straddles into pass i
            if i and j:
                tail, q = set(prev[self.n - j:].tolist()), self.c - j
                for h in range(self.c - j):  # the chunk's part in pass i: swap repeats further back
                    if perm[h] in tail:
                        while perm[q] in tail:
                            q += 1
                        perm[h], perm[q] = perm[q], perm[h]
                        q += 1
            self._passes = {i - 1: prev, i: perm} if prev is not None else {i: perm}
            prev = perm
        return self._passes[k]

    def take(self, t: int) -> np.ndarray:
        """Pool positions of chunk `t` (distinct)."""
        k, o = divmod(t * self.c, self.n)
        if o + self.c <= self.n:
            return self._pass(k)[o:o + self.c]
        head = self._pass(k)[o:]
        return np.concatenate([head, self._pass(k + 1)[:self.c - len(head)]])


class MATBatchSampler:
    """Micro-batches of `(sample index, view)` items for one data-parallel rank.

    `samples`: validated manifest samples (anything with `available_views(use_views)` and
    `modality`). `ratios`: e.g. {"V": 0.5, "A": 0.2, "AV": 0.3}; None trains on the samples as
    they come (no MAT, natural proportions). `derive_views`: also train the per-modality
    conversations of the manifest's `views`. `schedule`, `split`, `max_steps`: see
    `ModalityPlan`. Use as a DataLoader `batch_sampler`; each `iter()` runs to the end of the
    current epoch, the next one starts the next epoch."""

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
        schedule: str = DEFAULT_SCHEDULE,
        split: float = DEFAULT_SPLIT,
        max_steps: int | None = None,
    ):
        if not samples:
            raise ValueError("MAT sampler: no samples (the manifest validated to nothing?)")
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.start, self.end = rank_slice(self.global_batch_size, self.dp_rank, self.dp_size, self.micro_batch_size)
        self.seed = int(seed)
        self.derive_views = bool(derive_views)
        pools: dict[str, list[Item]] = {m: [] for m in MODALITIES}
        for i, s in enumerate(samples):
            for view in s.available_views(self.derive_views):
                pools[view].append((i, view))
        pools[ALL] = [(i, s.modality) for i, s in enumerate(samples)]
        self.plan = ModalityPlan.build(ratios, {m: len(pools[m]) for m in MODALITIES}, self.global_batch_size,
                                       schedule, split, max_steps)
        self.ratios = self.plan.ratios
        self.pools = {m: pools[m] for m in self.plan.modalities}
        self.streams = {m: PoolStream(len(self.pools[m]), c, self.seed, (*MODALITIES, ALL).index(m), m)
                        for m, c in self.plan.chunk.items()}
        self.batches_per_epoch = max(1, len(samples) // self.global_batch_size)
        self.consumed_samples = 0
        self.set_consumed_samples(consumed_samples)

    @property
    def counts(self) -> dict[str, int]:
        """Per-batch counts of the `mat` schedule (of the current step for pt1/pt2)."""
        return self.plan.counts(self.consumed_samples // self.global_batch_size)

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
    def rank_batches(self, step: int) -> list[list[Item]]:
        """Global batch `step` (counted from the start of training) as each rank's items."""
        counts = self.plan.counts(step)
        todo = {m: iter([self.pools[m][p] for p in self.streams[m].take(self.plan.consumed(step, m) // c)])
                for m, c in counts.items() if c}
        return [[next(todo[m]) for m in labels] for labels in rank_labels(counts, self.seed, step, self.dp_size)]

    def global_batch(self, step: int) -> list[Item]:
        """The whole global batch `step` (what all ranks together train on), rank after rank."""
        return [it for r in self.rank_batches(step) for it in r]

    def __iter__(self) -> Iterator[list[Item]]:
        epoch = self.epoch
        first = (self.consumed_samples % self.samples_per_epoch) // self.global_batch_size
        mbs = self.micro_batch_size
        for b in range(first, self.batches_per_epoch):
            mine = self.rank_batches(epoch * self.batches_per_epoch + b)[self.dp_rank]
            micro = [mine[i : i + mbs] for i in range(0, len(mine), mbs)]
            for k, mb in enumerate(micro):
                if k == len(micro) - 1:
                    self.consumed_samples += self.global_batch_size
                yield mb

    def __len__(self) -> int:
        """Micro-batches left in the current epoch for this rank."""
        left = self.batches_per_epoch - (self.consumed_samples % self.samples_per_epoch) // self.global_batch_size
        return left * (self.end - self.start) // self.micro_batch_size
