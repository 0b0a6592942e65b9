"""The frozen-encoder feature cache, read (`feature_build` writes it; `avllm features`).

Both training stages freeze the encoders (paper Fig. 2), so their outputs are a pure function of
the clip: computing them once and reading them back saves decoding 32 frames and running ViT-L
and HTSAT on every step of every epoch. Per clip the cache stores the tokens the model consumes:
temporal [T, Dv] ([CLS] per frame), spatial [N, Dv] (patch tokens averaged over frames) and, for
clips with sound, audio [K, Da], in bf16 or fp16.

Layout of a cache folder:
- `shard-000000.safetensors`, ...: many clips per shard, tensors named `<media id>/<kind>`;
- `clips.json`: media id -> shard file;
- `meta.json`: what the tokens depend on (encoder configs, which audio encoder: HTSAT or
  Whisper, T, K, image size, feature layer, sample rate, window) and their hash. `FeatureCache` refuses a cache whose meta differs from the
  model config, naming both values: stale features train silently wrong otherwise;
- `journal.jsonl`, `bad_files.jsonl`: progress and failures (failures in the prepare step's
  format, `index.bad_record`), so a killed run resumes where it stopped (finished shards are
  kept; clips that failed are reported and not retried).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from nemo_avllm.media import MediaError
from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)

META_NAME = "meta.json"
CLIPS_NAME = "clips.json"
JOURNAL_NAME = "journal.jsonl"
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMAT_VERSION = 1
# Settings a reader compares one by one, so the error can name the one that differs.
_CHECKED = ("audio_encoder", "num_frames", "num_audio_segments", "image_size", "num_patches", "feature_layer",
            "sample_rate", "window", "vision_width", "audio_width")
# Fields a cache may lack: HTSAT caches written before other audio encoders existed carry no
# `audio_encoder` (and HTSAT's fields keep leaving it out, so those caches stay valid).
DEFAULT_AUDIO_ENCODER = "htsat"
_DEFAULTS = {"audio_encoder": DEFAULT_AUDIO_ENCODER}


# --------------------------------------------------------------------------------------------
# What the tokens depend on
# --------------------------------------------------------------------------------------------


def fields_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _diff(cache: dict, model: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(cache) | set(model)):
        a, b = cache.get(key), model.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache {a!r}, model {b!r}")
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class FeatureCacheError(UserError):
    """A cache that is missing, unfinished, or built for another model config."""


def check_meta(meta: dict, expected: dict, what: str) -> None:
    """Refuse cached tokens made for another model config, naming what differs and the fix."""
    got = meta["fields"]
    field = lambda f, k: f.get(k, _DEFAULTS.get(k))  # noqa: E731
    diffs = [f"{k}: cache {field(got, k)!r}, model {field(expected, k)!r}" for k in _CHECKED
             if field(got, k) != field(expected, k)]
    if not diffs and meta["hash"] != fields_hash(expected):
        diffs = _diff({"vision": got.get("vision"), "audio": got.get("audio")},
                      {"vision": expected["vision"], "audio": expected["audio"]}) or ["encoder config hash"]
    if diffs:
        raise FeatureCacheError(
            f"{what} was built for another model config (hash {meta['hash']}, the model's is "
            f"{fields_hash(expected)}): {'; '.join(diffs[:6])}. Rebuild it for this model: "
            f"`avllm features model=<this model config> source=<manifest> out_dir=<new folder>`, then point "
            f"model.data.feature_cache at it (or at a cache built for this model), or set "
            f"model.data.feature_cache=null to decode media")


class FeatureCache:
    """Read-only view of a cache folder. With `expected` (training: `cache_fields` of the model),
    refuses a cache built for other encoders / T / K / image size / feature layer / audio window.
    Shards are opened lazily, per process, so it can be handed to DataLoader workers."""

    def __init__(self, path, expected: dict | None = None):
        self.path = Path(path)
        meta_file, clips_file = self.path / META_NAME, self.path / CLIPS_NAME
        if not meta_file.is_file():
            raise FeatureCacheError(
                f"feature cache {self.path} has no {META_NAME}; build it with "
                f"`avllm features source=<manifest> out_dir={self.path}` or set model.data.feature_cache=null")
        self.meta = json.loads(meta_file.read_text())
        if not clips_file.is_file():
            raise FeatureCacheError(
                f"feature cache {self.path} is unfinished (no {CLIPS_NAME}); rerun `avllm features` with the "
                f"same settings, it resumes where it stopped")
        self.index: dict[str, str] = json.loads(clips_file.read_text())  # media id -> shard file
        if expected is not None:
            self.check(expected)
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def check(self, expected: dict) -> None:
        check_meta(self.meta, expected, f"feature cache {self.path}")

    def check_layout(self, layout) -> None:
        """The token layout the dataset expands to must match the cached token counts."""
        f = self.meta["fields"]
        have = (f["num_frames"], f["num_patches"], f["num_audio_segments"])
        want = (layout.num_frames, layout.num_patches, layout.num_audio_segments)
        if have != want:
            raise FeatureCacheError(
                f"feature cache {self.path} holds T, N, K = {have}, the token layout is {want}; "
                f"rebuild the cache with `avllm features` for this model config")

    def __contains__(self, media_id: str) -> bool:
        return media_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, name: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a worker: don't share mmaps across processes
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), framework="pt", device="cpu")
        return self._handles[name]

    def get(self, media_id: str) -> dict[str, torch.Tensor] | None:
        """{"temporal": [T,Dv], "spatial": [N,Dv], "audio": [K,Da] (clips with sound)} or None.
        A damaged entry raises `MediaError` naming its shard and clip: the dataset replaces the
        sample as it does one with damaged media (`avllm features verify=true` lists them all)."""
        shard = self.index.get(media_id)
        if shard is None:
            return None
        try:
            f = self._shard(shard)
            out = {}
            for kind in ("temporal", "spatial", "audio"):
                key = f"{media_id}/{kind}"
                if key in f.keys():
                    out[kind] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise MediaError(str(self.path / shard), f"damaged feature-cache entry of clip {media_id} "
                             f"({type(e).__name__}: {e})") from None
        if "temporal" not in out or "spatial" not in out:
            raise MediaError(str(self.path / shard), f"damaged feature-cache entry of clip {media_id} (tensors missing)")
        return out

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d


def verify_cache(path) -> dict[str, str]:
    """Damaged shards of the cache at `path` (shard file -> reason): every tensor of every clip in
    `clips.json` is read back. Cheap next to building it; run it after copying a cache around."""
    cache = FeatureCache(path)
    damaged: dict[str, str] = {}
    for media_id, shard in cache.index.items():
        if shard in damaged:
            continue
        try:
            cache.get(media_id)
        except MediaError as e:
            damaged[shard] = e.reason
    return damaged
