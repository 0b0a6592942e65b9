"""Validated samples -> model-ready items (what `loaders` batches for MAT).

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
from typing import Sequence

import torch

from nemo_avllm import modality
from nemo_avllm.data.conversation import ConversationError, ConversationTemplate, tokenize_conversation
from nemo_avllm.data.decode import DecodeSettings, MediaSource, load_media, load_media_batch
from nemo_avllm.data.index import as_index
from nemo_avllm.data.manifest import Sample
from nemo_avllm.media import MediaError

log = logging.getLogger(__name__)


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
