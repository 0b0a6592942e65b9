"""Validated samples -> model-ready items, and the DataLoader that batches them for MAT.

An item is `(sample index, view)` (what `MATBatchSampler` yields; a plain int means the sample's
own view). `AVDataset[item]` tokenises the view's conversation (response-only labels, modality
tokens expanded) and attaches only the media its tokens ask for: decoded `video [T,3,S,S]` /
`audio [K,W]`, or, with a feature cache, the cached encoder outputs.

Bad media never stop training. Pipeline parallelism needs every micro-batch to have the same
shape, so a sample whose media fail to decode is *replaced*, not dropped: the dataset takes the
next sample (in manifest order, wrapping around) that offers the same view and decodes that one
instead. The replacement is a pure function of the item and of which files are bad, so it is the
same in every worker and on every rerun, and the batch keeps its modality mix. Each bad file is
logged once per process with its path; the collated batch lists the replaced files in
`bad_media` so the training loop can count them. With `replace_bad=False` (evaluation), the
dataset returns None and `collate_av` drops it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from functools import partial
from typing import Sequence

import torch

from nemo_avllm import modality
from nemo_avllm.data import media
from nemo_avllm.data.collate import collate_tokens
from nemo_avllm.data.conversation import ConversationError, ConversationTemplate, tokenize_conversation
from nemo_avllm.data.index import MediaIndex, as_index
from nemo_avllm.data.manifest import Sample
from nemo_avllm.data.mat_sampler import MATBatchSampler
from nemo_avllm.data.media import MediaError, MediaInfo
from nemo_avllm.data.packing import PackingSpec, collate_packed, make_spec, token_balanced
from nemo_avllm.data.workers import worker_kwargs

log = logging.getLogger(__name__)

FEATURE_KINDS = ("temporal", "spatial", "audio")


# --------------------------------------------------------------------------------------------
# What to decode, and how
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """Decode parameters; all but `backend` come from the model config, so the data always fits
    the encoders (T frames of S px, K CLAP windows of W samples at the encoder's rate)."""

    num_frames: int  # T
    num_audio_segments: int  # K
    image_size: int  # S
    sample_rate: int
    window: int  # W: samples per audio segment
    backend: str = "cpu"  # cpu | dali | auto (see media.decode_clip)

    @classmethod
    def from_model_config(cls, model_cfg, backend: str = "cpu") -> "DecodeSettings":
        from nemo_avllm.model.provider import avllm_config

        cfg = avllm_config(model_cfg)
        backend = media.resolve_backend(backend)  # decided once per run, so every worker agrees
        return cls(
            num_frames=cfg.num_frames,
            num_audio_segments=cfg.num_audio_segments,
            image_size=cfg.vision.geometry()["image_size"],
            sample_rate=cfg.audio.sample_rate,
            window=cfg.audio.clip_samples,
            backend=backend,
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MediaSource:
    """Where one clip's pixels and sound are read from (the FLAC side-car when prepared)."""

    media_id: str
    video: str
    audio: str  # file to read audio from: side-car FLAC, the manifest's audio file, or the video
    has_audio: bool | None
    info: MediaInfo | None = None

    @classmethod
    def of(cls, sample: Sample, index: MediaIndex | None = None) -> "MediaSource":
        return cls.lookup(sample.media_id, sample.video, sample.audio, sample.has_audio, index)

    @classmethod
    def lookup(cls, media_id: str, video: str, audio: str | None, has_audio: bool | None,
               index: MediaIndex | None = None) -> "MediaSource":
        """The prepare index's record when it has one (side-car FLAC, probe), else the files."""
        rec = index.get(media_id) if index is not None else None
        if rec is not None:
            return cls.of_record(rec)
        return cls(media_id, video, audio or video, has_audio)

    @classmethod
    def of_record(cls, rec: dict) -> "MediaSource":
        """From a prepare index record (what `features` iterates over without a manifest)."""
        audio = rec.get("flac") or rec.get("audio_path") or rec["path"]
        return cls(rec["id"], rec["path"], audio, bool(rec.get("has_audio")), MediaInfo.from_dict(rec))


def load_media(src: MediaSource, s: DecodeSettings, video: bool, audio: bool):
    """(video [T,3,S,S] | None, audio [K,W] | None). Raises MediaError for undecodable files and
    when audio is asked for but the clip has none."""
    v = a = None
    if video and (audio or s.backend != "cpu"):  # a DALI run decodes the pair in one pipeline
        clip = media.decode_clip(src.video, src.audio, s.num_frames, s.num_audio_segments, s.image_size,
                                 s.sample_rate, s.window, backend=s.backend, info=src.info)
        v, a = clip.video, clip.audio
    elif video:
        v, _, _ = media.decode_video(src.video, s.num_frames, s.image_size, info=src.info)
    elif audio:
        a = media.load_audio_segments(src.audio, s.num_audio_segments, s.sample_rate, s.window)
    if audio and a is None:
        raise MediaError(src.audio, "no audio track, but the sample's tokens ask for audio")
    return v, a if audio else None


_BATCH_DECODERS: dict = {}


def load_media_batch(sources: Sequence[MediaSource], s: DecodeSettings, audio: Sequence[bool]) -> list:
    """`load_media(video=True)` for several clips: per clip (video, audio) or the MediaError.

    In a DALI run the videos DALI reads go through one batched `VideoBatchDecoder` call (NVDEC on
    a GPU); still images and codecs it lacks take the per-clip path. Audio comes from
    `load_media` (the FLAC side-car)."""
    out: list = [None] * len(sources)
    batched = []
    if s.backend != "cpu":
        device = "gpu" if media.cuda_available() else "cpu"
        for i, src in enumerate(sources):
            try:
                info = src.info or media.probe(src.video)
            except MediaError as e:
                out[i] = e
                continue
            if media.dali_reads_video(info, device):
                batched.append((i, info))
    if batched:
        from dali_pipelines.video import VideoBatchDecoder

        key = (len(sources), s.image_size, device)
        if key not in _BATCH_DECODERS:
            _BATCH_DECODERS[key] = VideoBatchDecoder(len(sources), image_size=s.image_size, device=device)
        items = [(sources[i].video, media.sample_frame_indices(info.num_frames, s.num_frames), info.rotation)
                 for i, info in batched]
        video, ok = _BATCH_DECODERS[key].decode(items)
        for k, (i, _) in enumerate(batched):
            if not ok[k]:
                out[i] = MediaError(sources[i].video, f"DALI ({device}) could not decode it")
                continue
            try:
                out[i] = (video[k], load_media(sources[i], s, video=False, audio=audio[i])[1])
            except MediaError as e:
                out[i] = e
    for i, src in enumerate(sources):
        if out[i] is None:
            try:
                out[i] = load_media(src, s, video=True, audio=audio[i])
            except MediaError as e:
                out[i] = e
    return out


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class AVDataset(torch.utils.data.Dataset):
    """Map-style dataset over validated samples; see the module docstring for items and bad media."""

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer,
        layout: modality.TokenLayout,
        settings: DecodeSettings,
        *,
        index=None,
        feature_cache=None,
        max_length: int | None = None,
        derive_views: bool = False,
        replace_bad: bool = True,
        max_replacements: int = 64,
        template: ConversationTemplate = ConversationTemplate(),
    ):
        self.samples = list(samples)
        self.tokenizer, self.layout, self.settings = tokenizer, layout, settings
        self.index = as_index(index)
        self.cache = feature_cache
        self.max_length = max_length
        self.derive_views = derive_views
        self.replace_bad = replace_bad
        self.max_replacements = max_replacements
        self.template = template
        if self.cache is not None:
            self.cache.check_layout(layout)
        # per view: sample indices that offer it, in manifest order (replacement candidates)
        self._by_view: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            for view in s.available_views(derive_views):
                self._by_view.setdefault(view, []).append(i)
        self._pos = {v: {i: k for k, i in enumerate(ids)} for v, ids in self._by_view.items()}
        self.bad: dict[str, str] = {}  # media id -> reason (this process): skipped from now on
        self._predecoded: dict[int, tuple] = {}  # sample index -> (video, audio), within __getitems__
        self.bad_samples: dict[int, str] = {}  # sample index -> reason (unusable conversation)
        self._lengths: dict[tuple[int, str], int] = {}

    def token_length(self, item) -> int:
        """Tokens of an item as tokenised for training (cached; no media read): what packing's
        data-parallel token balancing weighs."""
        key = self._parse(item)
        if key not in self._lengths:
            try:
                tokens = tokenize_conversation(self.samples[key[0]].conversation(key[1]), self.tokenizer, self.layout,
                                               self.template, max_length=self.max_length)
                self._lengths[key] = len(tokens.input_ids)
            except ConversationError:
                self._lengths[key] = self.max_length or 0
        return self._lengths[key]

    def __len__(self) -> int:
        return len(self.samples)

    def _parse(self, item) -> tuple[int, str]:
        if isinstance(item, (tuple, list)):
            return int(item[0]), str(item[1])
        return int(item), self.samples[int(item)].modality

    def __getitem__(self, item) -> dict | None:
        i, view = self._parse(item)
        if view not in self._pos or i not in self._pos[view]:
            raise KeyError(f"sample {i} ({self.samples[i].id}) has no {view!r} view "
                           f"(views: {self.samples[i].available_views(self.derive_views)})")
        replaced: list[str] = []
        candidates = self._by_view[view]
        start = self._pos[view][i]
        for step in range(len(candidates)):
            j = candidates[(start + step) % len(candidates)]
            sample = self.samples[j]
            if sample.media_id not in self.bad and j not in self.bad_samples:
                try:
                    out = self.load(j, view)
                    out["bad_media"] = replaced
                    return out
                except MediaError as e:
                    self._mark_bad(sample, view, e, sample.media_id)
                except ConversationError as e:  # over-long prompt that validation did not see
                    self._mark_bad(sample, view, e, j)
            replaced.append(sample.video)
            if not self.replace_bad:
                return None
            if len(replaced) > self.max_replacements:
                break
        raise RuntimeError(
            f"{len(replaced)} samples in a row with view {view} starting at {self.samples[i].id} "
            f"({self.samples[i].file}:{self.samples[i].line}) could not be loaded; the data is broken: "
            f"rerun `avllm prepare` and check bad_files.jsonl")

    def __getitems__(self, items) -> list:
        """A whole micro-batch (the DataLoader calls this with the batch sampler's items). In a
        DALI run the videos of the batch's own samples are decoded in one batched call first;
        anything that fails there takes the per-item path with its replacement rules."""
        if self.cache is None and self.settings.backend != "cpu":
            todo = []
            for item in items:
                i, view = self._parse(item)
                sample = self.samples[i]
                if "V" in view and sample.media_id not in self.bad and i not in self._predecoded:
                    todo.append((i, MediaSource.of(sample, self.index), "A" in view))
            if todo:
                decoded = load_media_batch([src for _, src, _ in todo], self.settings, [a for _, _, a in todo])
                self._predecoded = {i: got for (i, _, _), got in zip(todo, decoded) if not isinstance(got, MediaError)}
        try:
            return [self[item] for item in items]
        finally:
            self._predecoded = {}

    def _mark_bad(self, sample: Sample, view: str, e: Exception, key) -> None:
        (self.bad if isinstance(key, str) else self.bad_samples)[key] = str(e)
        log.warning("sample %s (%s:%d) replaced by the next good %s sample: %s",
                    sample.id, sample.file, sample.line, view, e)

    def load(self, i: int, view: str) -> dict:
        """Sample `i` as `view`, without replacement (raises MediaError on bad media)."""
        sample = self.samples[i]
        features = source = None
        if self.cache is not None:
            features = self.cache.get(sample.media_id)
            if features is None:
                raise MediaError(sample.video, f"not in the feature cache {self.cache.path} (it failed there, "
                                               f"or the cache was built from another manifest)")
        else:
            source = MediaSource.of(sample, self.index)
        item = build_item(sample, view, self.tokenizer, self.layout, self.settings, source=source,
                          features=features, max_length=self.max_length, template=self.template,
                          decoded=self._predecoded.get(i))
        item["index"] = i
        return item


def build_item(
    sample: Sample,
    view: str,
    tokenizer,
    layout: modality.TokenLayout,
    settings: DecodeSettings,
    *,
    source: MediaSource | None = None,
    features: dict[str, torch.Tensor] | None = None,
    max_length: int | None = None,
    template: ConversationTemplate = ConversationTemplate(),
    decoded: tuple | None = None,
) -> dict:
    """One training item (shared by AVDataset and the shard reader): tokens of `view`, plus the
    media its tokens need, decoded from `source` (or already decoded: `decoded` = (video, audio))
    or picked from cached `features`."""
    tokens = tokenize_conversation(sample.conversation(view), tokenizer, layout, template, max_length=max_length)
    ids = torch.tensor(tokens.input_ids).unsqueeze(0)
    want_v, want_a = bool(modality.needs_visual(ids)), bool(modality.needs_audio(ids))
    item = {"id": sample.id, "modality": view, "tokens": tokens}
    if features is not None:
        picked = {}
        if want_v:
            picked["temporal"], picked["spatial"] = features["temporal"], features["spatial"]
        if want_a:
            if "audio" not in features:
                raise MediaError(sample.video, "the feature cache has no audio tokens for it (no audio track)")
            picked["audio"] = features["audio"]
        item["features"] = picked
        return item
    if decoded is not None and want_v and (decoded[1] is not None or not want_a):
        video, audio = decoded[0], decoded[1] if want_a else None
    else:
        video, audio = load_media(source, settings, want_v, want_a)
    if video is not None:
        item["video"] = video
    if audio is not None:
        item["audio"] = audio
    return item


# --------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# DataLoader
# --------------------------------------------------------------------------------------------


def build_dataloader(
    samples: Sequence[Sample],
    tokenizer,
    model_cfg,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    ratios: dict[str, float] | None = None,
    derive_views: bool = False,
    seed: int = 0,
    consumed_samples: int = 0,
    index=None,
    feature_cache=None,
    num_workers: int = 2,
    backend: str = "cpu",
    max_length: int | None = None,
    pin_memory: bool = False,
    schedule: str = "mat",
    schedule_split: float = 0.5,
    max_steps: int | None = None,
    packing: bool = False,
    fixed_shape: bool = False,
    thd: bool = False,
) -> torch.utils.data.DataLoader:
    """MAT sampler + AVDataset + collate for one data-parallel rank. `feature_cache`: a
    `features.FeatureCache` (built with `model_cfg`, so checked against it) or None.
    `loader.batch_sampler.state_dict(n)` goes in the checkpoint; pass `consumed_samples` back to
    resume exactly. `schedule`, `schedule_split`, `max_steps`: the modality schedule
    (`mat_sampler.ModalityPlan`). `packing`: one item per step, the rank's share of the global
    batch packed into micro-batches of `micro_batch_size` rows (`fixed_shape`: for pipeline
    parallelism; `thd`: Transformer Engine's layout), see `data.packing.make_spec`; the ranks'
    shares are then balanced by tokens (`data.packing.balance_ranks`)."""
    dataset = _dataset(samples, tokenizer, model_cfg, backend=backend, index=index, feature_cache=feature_cache,
                       max_length=max_length or seq_length, derive_views=derive_views)
    spec = packing_spec(seq_length, micro_batch_size, fixed_shape, tokenizer, thd) if packing else None
    per_batch = global_batch_size // dp_size if packing else micro_batch_size  # a step's share, or a micro-batch
    args = (samples, ratios, global_batch_size, per_batch, dp_rank, dp_size, seed, derive_views, consumed_samples,
            schedule, schedule_split, max_steps)
    if packing and dp_size > 1:  # ranks get balanced token counts (packing.balance_ranks)
        sampler = token_balanced(MATBatchSampler)(*args, length_of=dataset.token_length)
    else:
        sampler = MATBatchSampler(*args)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn(seq_length, pad_id_of(tokenizer), spec),
        pin_memory=pin_memory,
        **worker_kwargs(num_workers),
    )


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


def build_eval_dataloader(
    samples: Sequence[Sample],
    tokenizer,
    model_cfg,
    *,
    micro_batch_size: int,
    seq_length: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    index=None,
    feature_cache=None,
    num_workers: int = 2,
    backend: str = "cpu",
    packing: bool = False,
    fixed_shape: bool = False,
    thd: bool = False,
) -> torch.utils.data.DataLoader:
    """The training loader's dataset, collate and feature cache over every validation sample once
    (`EvalBatchSampler`); workers persist between validation passes. `packing`: each
    micro-batch's samples packed into at most `micro_batch_size` rows (a list of one)."""
    dataset = _dataset(samples, tokenizer, model_cfg, backend=backend, index=index, feature_cache=feature_cache,
                       max_length=seq_length)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=EvalBatchSampler(len(samples), micro_batch_size, dp_rank, dp_size),
        collate_fn=collate_fn(seq_length, pad_id_of(tokenizer),
                              packing_spec(seq_length, micro_batch_size, fixed_shape, tokenizer, thd) if packing else None),
        persistent_workers=num_workers > 0,
        **worker_kwargs(num_workers),
    )


def _dataset(samples, tokenizer, model_cfg, *, backend: str, index, feature_cache, max_length: int,
             derive_views: bool = False) -> AVDataset:
    """AVDataset with decode settings from the model config; `feature_cache` a FeatureCache or None."""
    if feature_cache is not None and not hasattr(feature_cache, "get"):
        raise TypeError(f"feature_cache={feature_cache!r}: pass a FeatureCache(path, model_cfg) "
                        f"(nemo_avllm.data.features), which checks the cache against the model config")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked
    settings = DecodeSettings.from_model_config(model_cfg, backend=backend)
    return AVDataset(samples, tokenizer, layout_of(model_cfg), settings, index=index, feature_cache=feature_cache,
                     max_length=max_length, derive_views=derive_views)


def layout_of(model_cfg) -> modality.TokenLayout:
    """The token layout (T, N, K) of a model config, without building the model."""
    from nemo_avllm.model.provider import avllm_config

    return avllm_config(model_cfg).layout()


def packing_spec(seq_length: int, rows: int, fixed_shape: bool, tokenizer, thd: bool = False) -> PackingSpec:
    return make_spec(seq_length, rows, fixed_shape, thd, pad_id_of(tokenizer))


def pad_id_of(tokenizer) -> int:
    """LLaMA tokenizers have no pad token; padding carries no loss, so any id works (0 = <unk>)."""
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
