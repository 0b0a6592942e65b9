"""The data's front door: one training loader and one evaluation loader for a `DataSpec`.

`train_loader` serves the three sources training reads: validated manifest samples (decoded
media, or the encoder tokens of the spec's feature cache) through `MATBatchSampler` and
`AVDataset`, and webdataset shards through `shards.ShardStream`, with the same modality plan.
`eval_loader` serves every validation sample once (`EvalBatchSampler`). Both collate with
`collate.collate_fn` (padded rows, or packed micro-batches with `spec.packing`)."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from nemo_avllm.data.collate import collate_fn, packing_spec, pad_id_of
from nemo_avllm.data.dataset import AVDataset
from nemo_avllm.data.features import FeatureCache
from nemo_avllm.data.manifest import Sample
from nemo_avllm.data.mat_sampler import MATBatchSampler
from nemo_avllm.data.packing import token_balanced
from nemo_avllm.data.shards import ShardStream
from nemo_avllm.data.spec import DataSpec
from nemo_avllm.data.workers import worker_kwargs

log = logging.getLogger(__name__)


def train_loader(spec: DataSpec, source: Sequence[Sample] | str | os.PathLike, tokenizer,
                 consumed_samples: int = 0, shard_epochs: int | None = None) -> torch.utils.data.DataLoader:
    """This data-parallel rank's training micro-batches, resuming after `consumed_samples`.
    `source`: validated samples, or the shards of `model.data.shards` (a folder, URL or brace
    pattern). The sampler (`loader.batch_sampler`, or `loader.dataset` for shards) gives the state
    for the checkpoint. With `spec.packing` one item is a step's share of the rank, packed into
    micro-batches of `micro_batch_size` rows; the ranks' shares are then balanced by tokens.
    Manifest samples run to the end of the epoch; shards are endless unless `shard_epochs`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked
    pack = _packing(spec, tokenizer, spec.micro_batch_size)
    per_batch = spec.global_batch_size // spec.dp_size if spec.packing else spec.micro_batch_size
    geometry = dict(ratios=dict(spec.mat_ratios) if spec.mat_ratios else None, global_batch_size=spec.global_batch_size,
                micro_batch_size=per_batch, dp_rank=spec.dp_rank, dp_size=spec.dp_size, seed=spec.seed,
                derive_views=spec.derive_views, consumed_samples=consumed_samples, schedule=spec.schedule,
                max_steps=spec.max_steps)
    if isinstance(source, (str, os.PathLike)):  # endless: epochs advance inside the stream
        stream = ShardStream(source, tokenizer, spec.layout, spec.decode, max_length=spec.seq_length,
                             feature_fields=spec.feature_fields, schedule_split=spec.schedule_split,
                             max_epochs=shard_epochs, **geometry)
        log.info("%s", stream.plan.describe())
        return _loader(spec, stream, pack, batch_size=None)
    dataset = _dataset(spec, source, tokenizer, derive_views=spec.derive_views)
    sampler_cls = token_balanced(MATBatchSampler) if spec.packing and spec.dp_size > 1 else MATBatchSampler
    extra = {"length_of": dataset.token_length} if spec.packing and spec.dp_size > 1 else {}
    sampler = sampler_cls(source, split=spec.schedule_split, **geometry, **extra)
    log.info("%s", sampler.plan.describe())
    return _loader(spec, dataset, pack, batch_sampler=sampler)


def eval_loader(spec: DataSpec, samples: Sequence[Sample], tokenizer) -> torch.utils.data.DataLoader:
    """This rank's validation micro-batches: the training dataset, collate and feature cache over
    every sample once (`EvalBatchSampler`); workers persist between validation passes. With
    `spec.packing` each micro-batch's samples are packed into at most `micro_batch_size` rows."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = _dataset(spec, samples, tokenizer)
    sampler = EvalBatchSampler(len(samples), spec.micro_batch_size, spec.dp_rank, spec.dp_size)
    return _loader(spec, dataset, _packing(spec, tokenizer, spec.micro_batch_size), batch_sampler=sampler,
                   persistent_workers=spec.num_workers > 0)


class EvalBatchSampler:
    """Validation batches of one data-parallel rank: every sample once, as its own view, in
    manifest order (rank r takes samples r, r+dp, ...). Micro-batches have a fixed size (pipeline
    stages exchange fixed shapes): the last one is padded by repeating its last sample, and
    `real_rows[k]` says how many rows of batch k count."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        mine = list(range(dp_rank, num_samples, dp_size))
        self.batches = [mine[k:k + micro_batch_size] for k in range(0, len(mine), micro_batch_size)]
        self.real_rows = [len(b) for b in self.batches]
        self.batches = [b + [b[-1]] * (micro_batch_size - len(b)) for b in self.batches]

    def __iter__(self):
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


def open_feature_cache(spec: DataSpec) -> FeatureCache | None:
    """The spec's feature cache, checked against what its tokens must be made for; None without one."""
    if not spec.feature_cache:
        return None
    cache = FeatureCache(spec.feature_cache)
    if spec.feature_fields is not None:
        cache.check(spec.feature_fields)
    return cache


def _dataset(spec: DataSpec, samples, tokenizer, derive_views: bool = False) -> AVDataset:
    return AVDataset(samples, tokenizer, spec.layout, spec.decode, index=spec.index,
                     feature_cache=open_feature_cache(spec), max_length=spec.seq_length, derive_views=derive_views)


def _packing(spec: DataSpec, tokenizer, rows: int):
    """The collate of the spec's loaders: padded rows, or packed micro-batches of `rows` rows."""
    pack = packing_spec(spec.seq_length, rows, spec.fixed_shape, tokenizer, spec.thd) if spec.packing else None
    return collate_fn(spec.seq_length, pad_id_of(tokenizer), pack)


def _loader(spec: DataSpec, data, collate, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, collate_fn=collate, pin_memory=spec.pin_memory, **kw,
                                       **worker_kwargs(spec.num_workers))
