"""Webdataset tar shards, read: stream millions of clips from object storage instead of opening files.

`shard_writer.write_shards` writes them (`shards.json` beside the tars lists them).
`ShardStream` (an IterableDataset; what training uses with `model.data.shards`) yields
micro-batches of the same item dicts as `AVDataset`, for one data-parallel rank, with the same
modality plan as `MATBatchSampler` (`ModalityPlan` and `rank_labels`: the same per-step counts,
schedule phases and per-rank shares). `path` is the folder or URL that holds `shards.json`, or a
brace pattern of some of its tars (`https://host/shards/{V,AV}-{000000..000003}.tar`). Each
modality is its own stream of records; a stream's shards are reshuffled per (seed, epoch) and partitioned over
the `dp_size * num_workers` consumers (by shard when there are enough shards, else by record),
so within one pass over a stream ranks and workers read disjoint data (a consumer whose part runs
out first goes on with the stream's next, reshuffled pass). DataLoader worker w builds micro-batches w, w+W, ...,
which the DataLoader returns in order, so the result is deterministic for a given seed, dp size
and worker count. A record whose media fail to decode is replaced by the next good record of the
same stream (looked ahead, not consumed), so a resume that skips consumed micro-batches without
decoding them lands on exactly the same records.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import tempfile
from collections import deque
from typing import Iterator

import numpy as np
import torch

from nemo_avllm import modality
from nemo_avllm.data.conversation import ConversationError, ConversationTemplate
from nemo_avllm.data.dataset import build_item
from nemo_avllm.data.decode import DecodeSettings, MediaSource
from nemo_avllm.data.features import check_meta
from nemo_avllm.data.manifest import MODALITIES, Sample
from nemo_avllm.data.mat_sampler import ALL, DEFAULT_SCHEDULE, DEFAULT_SPLIT, ModalityPlan, rank_labels, rank_slice
from nemo_avllm.media import MediaError, MediaInfo
from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)

SHARDS_NAME = "shards.json"
FORMAT_VERSION = 1


def read_shard(url: str) -> Iterator[dict]:
    """Records of one tar shard (local path or any webdataset URL, e.g. `pipe:aws s3 cp ...`):
    {"__key__", ext: bytes, ...}; the key is the member name up to its first dot."""
    stream = _open(url)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        current: dict | None = None
        for member in tar:
            if not member.isreg():
                continue
            key, _, ext = os.path.basename(member.name).partition(".")
            data = tar.extractfile(member).read()
            tar.members = []  # streaming: don't keep every header
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")
_SHELL = set("|&;<>()$`\\\"'\t\n*?[]#~{}")  # what makes a command need a shell


def check_shard_names(meta: dict, where: str) -> dict:
    """`shards.json` names files under its own folder: plain relative names only (no `..`, no
    absolute path, no shell metacharacters), since they are joined to a folder or a `pipe:`
    command. Returns `meta`."""
    for e in meta.get("shards", []):
        name = e.get("file") if isinstance(e, dict) else None
        if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name.split("/"):
            raise UserError(f"{where}: refused shard name {name!r}: names must be relative paths inside the shard "
                            f"folder made of letters, digits and _ . + - (as `avllm prepare` writes them)")
    return meta


def _open(url: str):
    """A readable stream of `url`. `pipe:CMD` runs CMD without a shell when it needs none (its
    shard name is checked, `check_shard_names`); other URLs go to webdataset's `gopen`."""
    import webdataset as wds

    if url.startswith("pipe:") and not _SHELL & set(url[5:]):
        import shlex
        import subprocess

        proc = subprocess.Popen(shlex.split(url[5:]), stdout=subprocess.PIPE)
        return _PipeStream(proc, url)
    return wds.gopen(url, "rb")


class _PipeStream:
    """The stdout of a `pipe:` command; closing it waits for the command and checks its status."""

    def __init__(self, proc, url: str):
        self.proc, self.url = proc, url

    def read(self, *args):
        return self.proc.stdout.read(*args)

    def close(self):
        self.proc.stdout.close()
        if self.proc.wait() != 0:
            raise OSError(f"{self.url}: the command exited with status {self.proc.returncode}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_shards_meta(base: str) -> dict:
    url = _join(base, SHARDS_NAME)
    try:
        with _open(url) as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read {url} ({e}); write shards with `avllm prepare shards.out_dir=<dir>` "
                                f"and set model.data.shards to that folder or URL") from e
    return check_shard_names(meta, url)


def open_shards(spec: str) -> tuple[str, dict]:
    """(base, shards.json) of `model.data.shards`: a folder or URL holding shards.json, or a
    brace pattern of tars in one (only those shards are read)."""
    spec = os.fspath(spec)
    if "{" not in spec:
        return spec, load_shards_meta(spec)
    from braceexpand import braceexpand

    base = spec[: spec.rfind("/", 0, spec.index("{"))]
    meta = load_shards_meta(base)
    by_name = {e["file"]: e for e in meta["shards"]}
    names = [u[len(base) + 1:] for u in braceexpand(spec)]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise FileNotFoundError(f"model.data.shards={spec}: {len(unknown)} shards ({', '.join(unknown[:3])}) are not "
                                f"listed in {_join(base, SHARDS_NAME)}; the pattern must name shards that "
                                f"`avllm prepare shards.out_dir=` wrote there")
    picked = [by_name[n] for n in dict.fromkeys(names)]
    return base, dict(meta, shards=picked, total=sum(e["count"] for e in picked))


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer over an endless iterator (size 0: unchanged order)."""
    if size <= 0:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = x


class _Stream:
    """One view's records for one consumer (rank x worker) in one epoch, endless, with look-ahead
    so a bad record can be replaced without consuming the records that follow it."""

    def __init__(self, base: str, shards: list[dict], view: str, derive: bool, seed: int, epoch: int, stream_id: int,
                 consumer: int, consumers: int, shuffle_buffer: int):
        if not shards:
            raise ValueError(f"no shard holds samples of view {view}")
        self.base, self.shards, self.view, self.derive = base, shards, view, derive
        self.seed, self.epoch, self.stream_id = seed, epoch, stream_id
        self.consumer, self.consumers = consumer, consumers
        rng = np.random.default_rng([seed, epoch, stream_id, consumer, 1])
        self._it = _shuffled(self._records(), shuffle_buffer, rng)
        self._ahead: deque = deque()

    def _matches(self, sample: Sample) -> bool:
        if self.view == ALL:
            return True
        return self.view in sample.available_views(True) if self.derive else sample.modality == self.view

    def _records(self) -> Iterator[tuple[dict, dict]]:
        c, C = self.consumer, self.consumers
        for k in range(1 << 62):
            order = np.random.default_rng([self.seed, self.epoch, self.stream_id, k]).permutation(len(self.shards))
            by_shard = len(self.shards) >= C
            mine = [self.shards[order[p]] for p in range(c, len(order), C)] if by_shard else [self.shards[i] for i in order]
            n = got = 0
            for entry in mine:
                for rec in read_shard(_join(self.base, entry["file"])):
                    meta = json.loads(rec["json"])
                    if not self._matches(Sample.from_json(meta)):
                        continue
                    n += 1
                    if not by_shard and (n - 1) % C != c:
                        continue
                    got += 1
                    yield rec, meta
            if not got:
                raise RuntimeError(
                    f"shards at {self.base}: consumer {c} of {C} (rank x DataLoader worker) gets no {self.view} "
                    f"samples; write more shards or use fewer workers")

    def take(self) -> tuple[dict, dict]:
        return self._ahead.popleft() if self._ahead else next(self._it)

    def peek(self, n: int) -> tuple[dict, dict]:
        while len(self._ahead) < n:
            self._ahead.append(next(self._it))
        return self._ahead[n - 1]


class ShardStream(torch.utils.data.IterableDataset):
    """Micro-batches (lists of AVDataset-style item dicts) for one data-parallel rank; see the
    module docstring. Endless (epochs advance inside) unless `max_epochs` is set; resumes
    exactly from `consumed_samples` given the same seed, dp size and number of workers."""

    def __init__(
        self,
        path,
        tokenizer,
        layout: modality.TokenLayout,
        settings: DecodeSettings,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        ratios: dict[str, float] | None = None,
        derive_views: bool = False,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
        max_length: int | None = None,
        feature_fields: dict | None = None,
        shuffle_buffer: int = 0,
        max_epochs: int | None = None,
        max_replacements: int = 64,
        template: ConversationTemplate = ConversationTemplate(),
        schedule: str = DEFAULT_SCHEDULE,
        schedule_split: float = DEFAULT_SPLIT,
        max_steps: int | None = None,
    ):
        super().__init__()
        self.base, self.meta = open_shards(path)
        self.features = self.meta["content"] == "features"
        if self.features and feature_fields is not None:  # what the cached tokens must be made for
            check_meta(self.meta["feature_meta"], feature_fields, f"shards {self.base}")
        self.tokenizer, self.layout, self.settings = tokenizer, layout, settings
        self.G, self.mbs = int(global_batch_size), int(micro_batch_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.start, self.end = rank_slice(self.G, dp_rank, dp_size, self.mbs)
        self.seed, self.derive = int(seed), bool(derive_views)
        self.max_length, self.template = max_length, template
        self.shuffle_buffer, self.max_epochs, self.max_replacements = shuffle_buffer, max_epochs, max_replacements
        shards = self.meta["shards"]
        have = {m: sum(e["views"][m] if self.derive else e["count"] * (e["modality"] == m) for e in shards)
                for m in MODALITIES}
        self.plan = ModalityPlan.build(ratios, have, self.G, schedule, schedule_split, max_steps)
        self.stream_shards = {m: shards if m == ALL else
                              [e for e in shards if (e["views"][m] if self.derive else e["modality"] == m)]
                              for m in self.plan.modalities}
        self.batches_per_epoch = max(1, int(self.meta["total"]) // self.G)
        self.consumed_samples = 0
        self.set_consumed_samples(consumed_samples)
        self.bad: set[str] = set()

    def set_consumed_samples(self, n: int) -> None:
        if n < 0 or n % self.G:
            raise ValueError(f"consumed_samples={n} is not a multiple of the global batch {self.G}")
        self.consumed_samples = int(n)

    def state_dict(self, consumed_samples: int | None = None) -> dict:
        n = self.consumed_samples if consumed_samples is None else int(consumed_samples)
        return {"consumed_samples": n, "epoch": n // (self.batches_per_epoch * self.G)}

    def load_state_dict(self, state: dict) -> None:
        self.set_consumed_samples(int(state["consumed_samples"]))

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        per_rank = (self.end - self.start) // self.mbs  # micro-batches per global batch on this rank
        spe = self.batches_per_epoch * self.G
        epoch = self.consumed_samples // spe
        j0 = (self.consumed_samples % spe) // self.G * per_rank
        with tempfile.TemporaryDirectory(prefix="avllm-shards-") as tmp:
            while self.max_epochs is None or epoch < self.max_epochs:
                streams = {m: _Stream(self.base, sh, m, self.derive, self.seed, epoch,
                                      MODALITIES.index(m) if m in MODALITIES else 3,
                                      self.dp_rank * W + w, self.dp_size * W, self.shuffle_buffer)
                           for m, sh in self.stream_shards.items()}
                labels_of = {}
                for j in range(w, self.batches_per_epoch * per_rank, W):
                    b, k = divmod(j, per_rank)
                    if b not in labels_of:
                        step = epoch * self.batches_per_epoch + b
                        labels_of = {b: rank_labels(self.plan.counts(step), self.seed, step, self.dp_size)[self.dp_rank]}
                    slots = labels_of[b][k * self.mbs : (k + 1) * self.mbs]
                    if j < j0:  # resume: consume the records without decoding them
                        for m in slots:
                            streams[m].take()
                        continue
                    yield [self._item(streams[m], m, tmp) for m in slots]
                epoch, j0 = epoch + 1, 0

    def _item(self, stream: _Stream, view: str, tmp: str) -> dict:
        replaced = []
        rec, meta = stream.take()
        for n in range(self.max_replacements + 1):
            if n:
                rec, meta = stream.peek(n)
            sample = Sample.from_json(meta)
            if sample.media_id not in self.bad:
                try:
                    item = self._build(rec, meta, sample, sample.modality if view == ALL else view, tmp)
                    item["bad_media"] = replaced
                    return item
                except (MediaError, ConversationError) as e:
                    self.bad.add(sample.media_id)
                    log.warning("shards: sample %s (%s) replaced by the next good one: %s", sample.id, rec["__url__"], e)
            replaced.append(sample.video)
        raise RuntimeError(f"{len(replaced)} bad samples in a row in the {view} stream at {self.base}; "
                           f"the shards are broken, rewrite them")

    def _build(self, rec: dict, meta: dict, sample: Sample, view: str, tmp: str) -> dict:
        kw = dict(max_length=self.max_length, template=self.template)
        if self.features:
            from safetensors.torch import load

            return build_item(sample, view, self.tokenizer, self.layout, self.settings,
                              features=load(rec["feat.safetensors"]), **kw)
        paths = {}
        try:
            for ext, data in rec.items():
                if ext.startswith(("video.", "audio.")):
                    paths[ext.split(".")[0]] = p = os.path.join(tmp, f"{rec['__key__']}.{ext}")
                    with open(p, "wb") as f:
                        f.write(data)
            if "video" not in paths:
                raise MediaError(sample.video, f"shard record {rec['__key__']} has no video member")
            info = MediaInfo.from_dict(meta["media_info"]) if meta.get("media_info") else None
            src = MediaSource(sample.media_id, paths["video"], paths.get("audio", paths["video"]), sample.has_audio, info)
            return build_item(sample, view, self.tokenizer, self.layout, self.settings, source=src, **kw)
        finally:
            for p in paths.values():
                os.unlink(p)
