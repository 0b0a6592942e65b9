"""The frozen-encoder feature cache, written: every distinct clip of a source decoded and encoded once.

What a cache folder holds is described in `features.py`, which reads it. Writing is resumable:
finished shards are kept and listed in `journal.jsonl`, clips that failed are reported in
`bad_files.jsonl` (the prepare step's format) and not retried. The encoders and the decode
settings come from the caller (`training.feature_cache` makes them from the model config).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from nemo_avllm.data.collate import stack_rows
from nemo_avllm.data.decode import DecodeSettings, MediaSource, load_media, load_media_batch
from nemo_avllm.data.features import (
    CLIPS_NAME,
    FORMAT_VERSION,
    JOURNAL_NAME,
    META_NAME,
    STORAGE_DTYPES,
    FeatureCacheError,
    fields_hash,
)
from nemo_avllm.data.index import BAD_FILES_NAME, INDEX_NAME, MediaIndex, as_index, bad_record, read_bad_files, read_jsonl
from nemo_avllm.data.manifest import Sample, read_inputs
from nemo_avllm.media import MediaError, backend_label, backend_mismatch

log = logging.getLogger(__name__)


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


def _read_journal(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(media id -> shard of the clips done, media id -> reason of the clips that failed)."""
    done = {rec["id"]: rec["shard"] for rec in read_jsonl(path / JOURNAL_NAME)}
    bad = {rec["id"]: rec["reason"] for rec in read_bad_files(path / BAD_FILES_NAME) if rec.get("id")}
    return done, bad


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_feature_cache(
    source,
    out_dir,
    fields: dict,
    settings: DecodeSettings,
    encoders,
    *,
    index=None,
    dtype: str = "bf16",
    clips_per_shard: int = 256,
    batch_size: int = 8,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> FeatureReport:
    """Encode every distinct clip of `source` once and write the cache (see module docstring).

    `source`: validated samples, manifest path(s) or a prepare folder / index.jsonl; `index`: the
    prepare output for side-car FLAC audio and has_audio. `fields`: what the tokens depend on
    (`training.data.cache_fields`); `settings`: the run's decode settings (one back-end per cache).
    `encoders`: the (vision, audio) modules, or a function of the device that builds them (called
    only when a clip is left to encode). Bad clips are reported in bad_files.jsonl, never fatal."""
    from tqdm import tqdm

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"data.feature_dtype={dtype!r}; expected one of {sorted(STORAGE_DTYPES)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    if not callable(encoders):
        vision, audio = encoders
        device = device or next(vision.parameters()).device
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vision, audio = encoders(device) if todo else (None, None)
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
