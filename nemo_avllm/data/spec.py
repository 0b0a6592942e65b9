"""What the data code is told about a run, in one frozen value: the `DataSpec`.

It is built once, outside `data/`, from the typed model config, `model.data` and the trainer
(`training.data.data_spec`), and handed to `loaders.train_loader` / `loaders.eval_loader`. The data
code receives T/N/K, the decode settings and the batch geometry from it and never reads the model
config, so a setting is read in one place and every loader of a run agrees on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from nemo_avllm.data.decode import DecodeSettings
from nemo_avllm.data.mat_sampler import DEFAULT_SCHEDULE, DEFAULT_SPLIT
from nemo_avllm.modality import TokenLayout


@dataclass(frozen=True)
class DataSpec:
    layout: TokenLayout  # T, N, K: the tokens a modality placeholder expands to
    decode: DecodeSettings  # T, K, S, audio rate and window, the run's decode back-end
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    dp_rank: int = 0
    dp_size: int = 1
    mat_ratios: Mapping[str, float] | None = None  # None: the samples in their natural proportions
    schedule: str = DEFAULT_SCHEDULE  # mat | pt1 | pt2 (mat_sampler.ModalityPlan)
    schedule_split: float = DEFAULT_SPLIT  # pt1/pt2: the fraction of the steps in the first phase
    max_steps: int | None = None  # the run's step count, which the pt1/pt2 split divides
    seed: int = 0
    num_workers: int = 2
    index: str | None = None  # the prepare folder (or its index.jsonl)
    feature_cache: str | None = None  # a folder `avllm features` wrote: cached encoder tokens
    feature_fields: dict | None = None  # what cached tokens must be made for (training.data.cache_fields)
    max_length_policy: str = "truncate"  # over-long samples: truncate | drop (manifest validation)
    derive_views: bool = False  # also train the manifest's per-modality `views`
    packing: bool = False  # a rank's share of a step packed into micro-batches (data.packing)
    fixed_shape: bool = False  # packed micro-batches of one shape (pipeline parallelism)
    thd: bool = False  # Transformer Engine's packed layout (cu_seqlens, no rows)
    pin_memory: bool = False
