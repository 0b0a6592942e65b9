"""The frozen-encoder feature cache (`avllm features`).

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from nemo_avllm.config import to_dict
from nemo_avllm.data.dataset import DecodeSettings, MediaSource, load_media, load_media_batch, stack_rows
from nemo_avllm.data.index import BAD_FILES_NAME, INDEX_NAME, MediaIndex, as_index, bad_record, read_bad_files, read_jsonl
from nemo_avllm.data.manifest import Sample, read_inputs
from nemo_avllm.data.media import MediaError, backend_label, backend_mismatch
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
_DEFAULTS = {"audio_encoder": "htsat"}


# --------------------------------------------------------------------------------------------
# What the tokens depend on
# --------------------------------------------------------------------------------------------


def _portable(enc: dict) -> dict:
    """Encoder config for hashing: a checkpoint counts by file name, not by where it lies."""
    d = json.loads(json.dumps(enc))  # tuples -> lists, as they come back from meta.json
    if d.get("checkpoint"):
        d["checkpoint"] = os.path.basename(str(d["checkpoint"]))
    return d


def cache_fields(model_cfg) -> dict:
    """Everything the cached tokens depend on, from a model config (no model is built)."""
    from nemo_avllm.model.provider import avllm_config

    cfg = avllm_config(model_cfg)
    s = DecodeSettings.from_model_config(model_cfg)
    geo = cfg.vision.geometry()
    audio = _portable({k: v for k, v in asdict(cfg.audio).items() if k != "type"})
    fields = {
        "num_frames": s.num_frames,
        "num_audio_segments": s.num_audio_segments,
        "image_size": s.image_size,
        "num_patches": geo["num_patches"],
        "feature_layer": cfg.vision.feature_layer,
        "sample_rate": s.sample_rate,
        "window": s.window,
        "vision_width": geo["width"],
        "audio_width": cfg.audio.width,
        "vision": _portable(asdict(cfg.vision)),
        "audio": audio,
    }
    if cfg.audio.type != _DEFAULTS["audio_encoder"]:  # whisper: its caches and HTSAT's are never mixed
        fields["audio_encoder"] = cfg.audio.type
    return fields


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
    """Read-only view of a cache folder. With `model_cfg` (training), refuses a cache built for
    other encoders / T / K / image size / feature layer / audio window. Shards are opened lazily,
    per process, so it can be handed to DataLoader workers."""

    def __init__(self, path, model_cfg=None):
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
        if model_cfg is not None:
            self.check(cache_fields(model_cfg))
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureReport:
    total: int  # distinct clips asked for
    written: int  # encoded in this run
    skipped: int  # already in the cache or known bad (resume)
    failed: int  # could not be decoded (bad_files.jsonl; not retried on resume)
    shards: int  # shard files in the cache
    elapsed_s: float
    path: str

    @property
    def clips_per_s(self) -> float:
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        return (f"features: {self.total} clips, {self.written} encoded ({self.clips_per_s:.2f} clips/s), "
                f"{self.skipped} already cached, {self.failed} bad (see {self.path}/{BAD_FILES_NAME}); "
                f"{self.shards} shards in {self.path}")


def _sources(source, index) -> list[MediaSource]:
    """Distinct clips of: validated samples, manifest path(s), or a prepare folder / index.jsonl.

    Manifests are read for their media only (`manifest.read_inputs`): the cache needs no valid
    conversation, so evaluation manifests (which end with a question) are cached too."""
    index = as_index(index)
    if isinstance(source, MediaIndex):
        return [MediaSource.of_record(r) for r in source.records.values()]
    if isinstance(source, (str, os.PathLike)):
        if Path(source).is_dir() or Path(source).name == INDEX_NAME:
            return [MediaSource.of_record(r) for r in MediaIndex.load(source).records.values()]
        source = [source]
    seen, out = set(), []
    for entry in source:
        if isinstance(entry, Sample):
            items = [(entry.media_id, entry.video, entry.audio, entry.has_audio)]
        else:
            items = [(it.id, it.video, it.audio, None) for it in read_inputs(entry)]
        for mid, video, audio, has_audio in items:
            if mid in seen:
                continue
            seen.add(mid)
            out.append(MediaSource.lookup(mid, video, audio, has_audio, index))
    return out


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


def _read_journal(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(media id -> shard of the clips done, media id -> reason of the clips that failed)."""
    done = {rec["id"]: rec["shard"] for rec in read_jsonl(path / JOURNAL_NAME)}
    bad = {rec["id"]: rec["reason"] for rec in read_bad_files(path / BAD_FILES_NAME) if rec.get("id")}
    return done, bad


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def build_encoders(model_cfg, device: str | torch.device = "cpu"):
    """The frozen vision and audio encoders of a model config, in `model.encoder_dtype`, eval mode.
    Null encoder checkpoints are refused unless `model.allow_random_init=true`."""
    from nemo_avllm.model.encoders import VisionEncoder, build_audio_encoder
    from nemo_avllm.model.provider import avllm_config, check_encoder_weights

    check_encoder_weights({**to_dict(model_cfg), "build_encoders": True})
    cfg = avllm_config(model_cfg)
    return (VisionEncoder(cfg.vision).to(device).set_dtype(cfg.encoder_dtype),
            build_audio_encoder(cfg.audio).to(device).set_dtype(cfg.encoder_dtype))


def build_feature_cache(
    source,
    out_dir,
    model_cfg,
    *,
    index=None,
    dtype: str = "bf16",
    clips_per_shard: int = 256,
    batch_size: int = 8,
    backend: str = "auto",
    device: str | None = None,
    encoders: tuple | None = None,
    resume: bool = True,
    progress: bool = True,
) -> FeatureReport:
    """Encode every distinct clip of `source` once and write the cache (see module docstring).

    `source`: validated samples, manifest path(s) or a prepare folder / index.jsonl; `index`: the
    prepare output for side-car FLAC audio and has_audio. `encoders`: (vision, audio) modules to
    use instead of building them from `model_cfg` (e.g. a model's own). Bad clips are reported
    in bad_files.jsonl, never fatal."""
    from tqdm import tqdm

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"data.feature_dtype={dtype!r}; expected one of {sorted(STORAGE_DTYPES)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = cache_fields(model_cfg)
    settings = DecodeSettings.from_model_config(model_cfg, backend=backend)  # one back-end for the run
    meta = {"version": FORMAT_VERSION, "hash": fields_hash(fields), "dtype": dtype, "fields": fields,
            "decode_backend": backend_label(settings.backend)}
    meta_file = out / META_NAME
    if meta_file.is_file() and resume:
        old = json.loads(meta_file.read_text())
        if old.get("hash") != meta["hash"] or old.get("dtype") != dtype:
            raise FeatureCacheError(
                f"{out} holds a feature cache for another config (hash {old.get('hash')}, dtype {old.get('dtype')}; "
                f"now {meta['hash']}, {dtype}); choose another data.feature_cache folder or delete this one")
        mismatch = backend_mismatch(old.get("decode_backend"), meta["decode_backend"], out)
        if mismatch:
            raise FeatureCacheError(mismatch)
    if not resume:
        for f in out.glob("shard-*.safetensors"):
            f.unlink()
        for name in (JOURNAL_NAME, BAD_FILES_NAME, CLIPS_NAME):
            (out / name).unlink(missing_ok=True)
    _write_json(meta_file, meta)

    sources = _sources(source, index)
    done, bad = _read_journal(out) if resume else ({}, {})
    done = {k: v for k, v in done.items() if (out / v).is_file()}
    todo = [s for s in sources if s.media_id not in done and s.media_id not in bad]
    skipped = len(sources) - len(todo)
    if encoders is not None:
        vision, audio = encoders
        device = device or next(vision.parameters()).device
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vision, audio = build_encoders(model_cfg, device) if todo else (None, None)
    store = STORAGE_DTYPES[dtype]
    next_shard = 1 + max((int(f.stem.split("-")[1]) for f in out.glob("shard-*.safetensors")), default=-1)
    pending: dict[str, torch.Tensor] = {}
    pending_ids: list[str] = []
    written = failed = 0

    with open(out / JOURNAL_NAME, "a") as journal, open(out / BAD_FILES_NAME, "a") as bad_f:

        def flush() -> None:
            nonlocal next_shard, pending, pending_ids
            if not pending_ids:
                return
            from safetensors.torch import save_file

            name = f"shard-{next_shard:06d}.safetensors"
            tmp = out / (name + ".tmp")
            save_file(pending, str(tmp), metadata={"hash": meta["hash"]})
            os.replace(tmp, out / name)
            for mid in pending_ids:
                journal.write(json.dumps({"id": mid, "shard": name}) + "\n")
                done[mid] = name
            journal.flush()
            next_shard += 1
            pending, pending_ids = {}, []

        bar = tqdm(total=len(todo), desc="features", unit="clip", disable=not progress)
        for start in range(0, len(todo), batch_size):
            clips = []
            chunk = todo[start : start + batch_size]
            decoded = load_media_batch(chunk, settings, [src.has_audio is not False for src in chunk])
            for src, got in zip(chunk, decoded):
                try:
                    if isinstance(got, MediaError):
                        if src.has_audio is not None:  # known audio (or none asked for): a real failure
                            raise got
                        got = load_media(src, settings, video=True, audio=False)  # no usable sound: visual only
                    clips.append((src, *got))
                except MediaError as e:
                    bad_f.write(json.dumps(bad_record(src.video, str(e), file=e.path, media_id=src.media_id)) + "\n")
                    bad_f.flush()
                    log.warning("features: skipping %s: %s", src.video, e)
                    failed += 1
            if clips:
                feats = encode_clips(vision, audio, [c[1] for c in clips], [c[2] for c in clips], device)
                for (src, _, _), f in zip(clips, feats):
                    for kind, t in f.items():
                        pending[f"{src.media_id}/{kind}"] = t.to(store).contiguous()
                    pending_ids.append(src.media_id)
                    written += 1
                    if len(pending_ids) >= clips_per_shard:
                        flush()
            bar.update(min(batch_size, len(todo) - start))
        flush()
        bar.close()

    _write_json(out / CLIPS_NAME, done)  # everything cached so far, also by earlier runs on other sources
    _, bad = _read_journal(out)
    failed = len({s.media_id for s in sources} & set(bad))
    return FeatureReport(total=len(sources), written=written, skipped=skipped, failed=failed,
                         shards=len(list(out.glob("shard-*.safetensors"))), elapsed_s=time.perf_counter() - t0,
                         path=str(out))


@torch.no_grad()
def encode_clips(vision, audio, videos: Sequence[torch.Tensor], audios: Sequence[torch.Tensor | None],
                 device) -> list[dict[str, torch.Tensor]]:
    """Run the frozen encoders on a batch of decoded clips -> per clip {temporal, spatial, audio}."""
    e_t, e_s = vision(stack_rows(list(videos), device))  # decoders may leave rows on GPU or CPU
    out = [{"temporal": e_t[i].cpu(), "spatial": e_s[i].cpu()} for i in range(len(videos))]
    with_audio = [i for i, a in enumerate(audios) if a is not None]
    if with_audio:
        e_a = audio(stack_rows([audios[i] for i in with_audio], device))
        for k, i in enumerate(with_audio):
            out[i]["audio"] = e_a[k].cpu()
    return out


def run(cfg) -> int:
    """`avllm features` / `scripts/features.py` with a composed `conf/features.yaml`.
    `verify=true`: only check the cache at out_dir (exit 1 when a shard is damaged);
    `repair=true`: set damaged shards aside (`*.damaged`) and re-encode their clips."""
    if cfg.get("verify") or cfg.get("repair"):
        damaged = verify_cache(cfg.out_dir)
        for shard, why in sorted(damaged.items()):
            print(f"damaged: {Path(cfg.out_dir) / shard}: {why}")
        if not cfg.get("repair"):
            print(f"feature cache {cfg.out_dir}: {len(damaged)} damaged shards"
                  + ("; rerun with repair=true source=<the manifests> to re-encode their clips" if damaged else ""))
            return 1 if damaged else 0
        for shard in damaged:
            os.replace(Path(cfg.out_dir) / shard, Path(cfg.out_dir) / f"{shard}.damaged")  # resume re-encodes them
    source = list(cfg.source) if not isinstance(cfg.source, str) else cfg.source
    report = build_feature_cache(
        source, cfg.out_dir, cfg.model, index=cfg.get("index"), dtype=cfg.dtype, clips_per_shard=int(cfg.clips_per_shard),
        batch_size=int(cfg.batch_size), backend=cfg.backend, resume=bool(cfg.resume),
    )
    print(report)
    return 0
