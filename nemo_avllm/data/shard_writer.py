"""Webdataset tar shards, written: what `avllm prepare shards.out_dir=` makes of validated samples.

`write_shards` (what `prepare` calls with `--shards`) writes one tar stream per modality class
(`V-000000.tar`, `A-...`, `AV-...`), samples shuffled (seeded) before writing because readers
read shards sequentially. A sample is `<key>.json` (the validated manifest sample) plus either the
media bytes (`<key>.video.<ext>`, `<key>.audio.flac` from the prepare side-car or
`<key>.audio.<ext>` from the manifest) or the cached encoder tokens (`<key>.feat.safetensors`).
`shards.json` lists the shards with their per-view counts (and the feature-cache meta).
`shards.ShardStream` reads them back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nemo_avllm.data.index import as_index
from nemo_avllm.data.manifest import MODALITIES, Sample
from nemo_avllm.media import MediaError
from nemo_avllm.data.shards import FORMAT_VERSION, SHARDS_NAME

log = logging.getLogger(__name__)


@dataclass
class ShardReport:
    written: int
    skipped: int  # media missing on disk, or not in the feature cache
    shards: int
    path: str
    elapsed_s: float

    def __str__(self) -> str:
        return (f"shards: {self.written} samples in {self.shards} shards at {self.path}, {self.skipped} skipped; "
                f"{self.elapsed_s:.1f} s")


def _sample_files(sample: Sample, index, cache) -> dict[str, bytes]:
    """The tar members of one sample (besides its json); raises OSError/MediaError when missing."""
    if cache is not None:
        from safetensors.torch import save

        feats = cache.get(sample.media_id)
        if feats is None:
            raise MediaError(sample.video, f"not in the feature cache {cache.path}")
        return {"feat.safetensors": save(feats)}
    files = {f"video{Path(sample.video).suffix.lower() or '.bin'}": Path(sample.video).read_bytes()}
    rec = index.get(sample.media_id) if index is not None else None
    if rec is not None and rec.get("flac"):
        files["audio.flac"] = Path(rec["flac"]).read_bytes()
    elif sample.audio:
        files[f"audio{Path(sample.audio).suffix.lower() or '.bin'}"] = Path(sample.audio).read_bytes()
    return files


def write_shards(
    samples: Sequence[Sample],
    out_dir,
    *,
    index=None,
    feature_cache=None,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    seed: int = 0,
) -> ShardReport:
    """Write validated samples as tar shards (media bytes, or cached tokens with `feature_cache`)."""
    import webdataset as wds

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = as_index(index)
    entries, written, skipped = [], 0, 0
    for m in MODALITIES:
        group = [s for s in samples if s.modality == m]
        order = np.random.default_rng([seed, MODALITIES.index(m)]).permutation(len(group))
        writer, entry, size = None, None, 0

        def close():
            if writer is not None:
                writer.close()
                os.replace(out / (entry["file"] + ".tmp"), out / entry["file"])
                entries.append(entry)

        for k in order:
            s = group[k]
            try:
                files = _sample_files(s, index, feature_cache)
            except (OSError, MediaError) as e:
                log.warning("shards: skipping %s (%s:%d): %s", s.id, s.file, s.line, e)
                skipped += 1
                continue
            record = s.to_json()
            rec = index.get(s.media_id) if index is not None else None
            if rec is not None:
                record["media_info"] = rec
            nbytes = sum(len(b) for b in files.values())
            if writer is None or entry["count"] >= samples_per_shard or (entry["count"] and size + nbytes > max_shard_bytes):
                close()
                name = f"{m}-{sum(e['modality'] == m for e in entries):06d}.tar"
                writer = wds.TarWriter(str(out / (name + ".tmp")), encoder=False, mtime=0)
                entry, size = {"file": name, "modality": m, "count": 0, "views": dict.fromkeys(MODALITIES, 0)}, 0
            key = f"{m.lower()}{entry['count']:09d}"
            writer.write({"__key__": key, "json": json.dumps(record).encode(), **files})
            entry["count"] += 1
            for view in s.available_views(True):
                entry["views"][view] += 1
            size += nbytes
            written += 1
        close()
    meta = {"version": FORMAT_VERSION, "content": "features" if feature_cache is not None else "media",
            "feature_meta": feature_cache.meta if feature_cache is not None else None,
            "total": written, "shards": entries}
    tmp = out / (SHARDS_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / SHARDS_NAME)
    return ShardReport(written, skipped, len(entries), str(out), time.perf_counter() - t0)
