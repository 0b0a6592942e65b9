"""The `prepare` step: probe every video once, write a 48 kHz mono FLAC side-car of its audio,
and an index that training, `features` and the DALI pipelines read instead of re-probing.

Outputs in `out_dir`:
- `index.jsonl`: one JSON line per good video: `path`, `id`, the probe fields of
  `media.MediaInfo` (num_frames, fps, duration, width, height, rotation, video_codec, container,
  is_image, audio_channels/audio_sample_rate/audio_codec of the audio source), `audio_path` (the
  manifest's separate audio file or null), `flac` (absolute side-car path or null), `has_audio`
  (a side-car exists), `audio_seconds`, and `stamp`/`audio_stamp` ([size, mtime_ns], for resume);
- `audio/<id>.flac`: 48 kHz mono 16-bit FLAC (DALI's audio decoder reads FLAC, not AAC);
- `bad_files.jsonl`: `{"path", "reason"}` for every file that failed, so one bad file never
  stops a run.

Runs on a process pool over all cores, with a progress bar. Index lines are appended and flushed
one by one, so a killed run leaves a valid index (a torn last line is ignored on reading) and the
next run resumes: videos whose size and mtime are unchanged are skipped. At the end the index is
rewritten (temp file + rename) with one line per input video, in input order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from nemo_avllm.data.media import SAMPLE_RATE, MediaError, decode_audio, probe, probe_audio

INDEX_NAME = "index.jsonl"
BAD_FILES_NAME = "bad_files.jsonl"
AUDIO_DIR = "audio"


@dataclass
class PrepareReport:
    """Counts of one `prepare` run."""

    total: int  # distinct videos in the input
    prepared: int  # probed (and side-car written) in this run
    skipped: int  # already in the index and unchanged (resume)
    failed: int  # listed in bad_files.jsonl
    with_audio: int  # index entries that have a FLAC side-car
    index_path: str
    bad_files_path: str
    elapsed_s: float

    @property
    def indexed(self) -> int:
        return self.prepared + self.skipped

    def __str__(self) -> str:
        return (
            f"prepare: {self.total} videos, {self.prepared} prepared, {self.skipped} unchanged (skipped), "
            f"{self.failed} bad (see {self.bad_files_path}), {self.with_audio} with audio; "
            f"index {self.index_path}; {self.elapsed_s:.1f} s"
        )


@dataclass(frozen=True)
class PrepareItem:
    video: str  # absolute path
    audio: str | None  # absolute path of a separate audio file, if the manifest gives one
    id: str


def stable_id(video: str, audio: str | None = None) -> str:
    """Readable and collision-free: `<stem>-<sha1(abs paths)[:12]>`, the same on every run."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(video).stem)[:48] or "video"
    key = video if audio is None else f"{video}\n{audio}"
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


MANIFEST_SUFFIXES = (".jsonl", ".json", ".txt")


def resolve_media_path(p, base: Path) -> str:
    """A manifest path -> absolute, resolved path; media ids (`stable_id`) are computed on it,
    so the prepare index, manifests and the feature cache agree on them."""
    path = Path(os.path.expanduser(str(p)))
    return str((path if path.is_absolute() else base / path).resolve())


def read_inputs(source) -> list[PrepareItem]:
    """A manifest (JSON Lines with `video` and optional `audio`, paths relative to its folder or
    absolute; a line may also be a bare path), a list of manifests (.jsonl/.json/.txt), or a list
    of video paths → distinct items."""
    if not isinstance(source, (str, os.PathLike)) and source and all(
        Path(str(p)).suffix in MANIFEST_SUFFIXES for p in source
    ):
        rows_all = [it for m in source for it in read_inputs(m)]
        seen_ids, merged = set(), []
        for it in rows_all:
            if it.id not in seen_ids:
                seen_ids.add(it.id)
                merged.append(it)
        return merged
    rows: list[tuple[str, str | None]] = []
    if isinstance(source, (str, os.PathLike)):
        manifest = Path(source)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest} not found")
        base = manifest.resolve().parent
        for lineno, line in enumerate(manifest.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{manifest}:{lineno}: not valid JSON ({e})") from e
                if "video" not in rec:
                    raise ValueError(f"{manifest}:{lineno}: a manifest line needs a 'video' field")
                audio = rec.get("audio")
                rows.append((resolve_media_path(rec["video"], base), resolve_media_path(audio, base) if audio else None))
            else:
                rows.append((resolve_media_path(line, base), None))
    else:
        cwd = Path.cwd()
        rows = [(resolve_media_path(p, cwd), None) for p in source]
    seen, items = set(), []
    for video, audio in rows:
        if (video, audio) not in seen:
            seen.add((video, audio))
            items.append(PrepareItem(video, audio, stable_id(video, audio)))
    return items


def _stamp(path: str | None) -> list[int] | None:
    """(size, mtime_ns): what resume compares to decide a file is unchanged."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _key(video: str, audio: str | None) -> str:
    return video if audio is None else f"{video}|{audio}"


def write_flac(path: Path, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit mono FLAC, written to a temp name and renamed so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    sf.write(tmp, np.clip(wave, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


def prepare_one(item: PrepareItem, audio_dir: str) -> dict:
    """Probe one video and write its side-car. Never raises: returns {"ok": bool, ...}."""
    try:
        stamp = _stamp(item.video) if os.path.isfile(item.video) else None
        info = probe(item.video)
        if item.audio is not None:
            audio_info = probe_audio(item.audio)
            if audio_info is None:
                raise MediaError(item.audio, "the manifest's audio file has no audio stream")
            src = item.audio
        else:
            audio_info = {"audio_channels": info.audio_channels, "audio_sample_rate": info.audio_sample_rate,
                          "audio_codec": info.audio_codec}
            src = item.video if info.has_audio else None
        flac, seconds = None, 0.0
        if src is not None:
            wave = decode_audio(src, SAMPLE_RATE)
            if wave is not None and wave.size:
                flac_path = Path(audio_dir) / f"{item.id}.flac"
                write_flac(flac_path, wave)
                flac, seconds = str(flac_path), round(wave.size / SAMPLE_RATE, 6)
        record = info.to_dict()
        record.update(audio_info)
        record.update(
            id=item.id,
            path=item.video,
            audio_path=item.audio,
            has_audio=flac is not None,
            flac=flac,
            audio_seconds=seconds,
            stamp=stamp,
            audio_stamp=_stamp(item.audio),
        )
        return {"ok": True, "record": record}
    except MediaError as e:
        return {"ok": False, "path": e.path, "video": item.video, "reason": e.reason}
    except Exception as e:  # a crash on one file must not stop the run
        return {"ok": False, "path": item.video, "video": item.video, "reason": f"{type(e).__name__}: {e}"}


def _pool_context():
    """forkserver: workers fork from a clean server (no inherited DALI/torch threads, which make
    plain fork unsafe) that has this module imported once, so they start in milliseconds."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["nemo_avllm.data.prepare"])
        return ctx
    return mp.get_context("spawn")


def _worker_start() -> None:
    """A pool worker answers SIGTERM again: it may fork from the DataLoader forkserver (one per
    process), which ignores SIGTERM (`forkserver_init`), and `Pool.terminate` stops workers with it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _work(args):
    return prepare_one(*args)


def load_index(path) -> list[dict]:
    """Records of an index (or of `out_dir/index.jsonl`); later lines for the same video win and a
    torn last line from a killed run is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        return []
    by_key: dict[str, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "path" in rec:
                by_key[_key(rec["path"], rec.get("audio_path"))] = rec
    return list(by_key.values())


def _unchanged(rec: dict, item: PrepareItem) -> bool:
    try:
        if rec.get("stamp") != _stamp(item.video) or rec.get("audio_stamp") != _stamp(item.audio):
            return False
    except OSError:
        return False
    return rec.get("flac") is None or os.path.isfile(rec["flac"])


def _append(f, obj: dict) -> None:
    f.write(json.dumps(obj) + "\n")
    f.flush()


def prepare(
    source,
    out_dir,
    num_workers: int | None = os.cpu_count(),
    resume: bool = True,
    progress: bool = True,
) -> PrepareReport:
    """Probe + FLAC side-car + index for every video of `source` (manifest path or list of paths).

    Bad files go to `out_dir/bad_files.jsonl` and are left out of the index; the run goes on.
    With `resume`, videos already indexed with unchanged size+mtime are skipped.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    audio_dir = out / AUDIO_DIR
    audio_dir.mkdir(parents=True, exist_ok=True)
    index_path, bad_path = out / INDEX_NAME, out / BAD_FILES_NAME
    items = read_inputs(source)

    previous = {_key(r["path"], r.get("audio_path")): r for r in load_index(index_path)} if resume else {}
    records: dict[str, dict] = {}
    todo: list[PrepareItem] = []
    for item in items:
        rec = previous.get(_key(item.video, item.audio))
        if rec is not None and _unchanged(rec, item):
            records[_key(item.video, item.audio)] = rec
        else:
            todo.append(item)
    skipped = len(records)

    failed = prepared = 0
    workers = max(1, min(num_workers or 1, len(todo)))
    jobs = [(item, str(audio_dir)) for item in todo]
    with open(index_path, "a" if resume else "w") as index_f, open(bad_path, "w") as bad_f:
        bar = tqdm(total=len(todo), desc="prepare", unit="video", disable=not progress)
        pool = None
        try:
            if workers > 1:
                pool = _pool_context().Pool(workers, initializer=_worker_start)
                results: Iterable[dict] = pool.imap_unordered(_work, jobs, chunksize=1)
            else:
                results = map(_work, jobs)
            for res in results:
                if res["ok"]:
                    rec = res["record"]
                    records[_key(rec["path"], rec.get("audio_path"))] = rec
                    _append(index_f, rec)
                    prepared += 1
                else:
                    _append(bad_f, {"path": res["video"], "file": res["path"], "reason": res["reason"]})
                    failed += 1
                bar.update(1)
                bar.set_postfix(bad=failed, refresh=False)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()

    # Compact: one line per input video, input order; temp + rename keeps it valid throughout.
    ordered = [records[k] for k in (_key(i.video, i.audio) for i in items) if k in records]
    tmp = index_path.with_name(index_path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in ordered:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, index_path)

    return PrepareReport(
        total=len(items),
        prepared=prepared,
        skipped=skipped,
        failed=failed,
        with_audio=sum(1 for r in ordered if r.get("flac")),
        index_path=str(index_path),
        bad_files_path=str(bad_path),
        elapsed_s=time.perf_counter() - t0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nemo_avllm.data.prepare MANIFEST OUT_DIR [--workers N] [--no-resume]`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", help="JSON Lines manifest ('video', optional 'audio') or a text file of paths")
    ap.add_argument("out_dir")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-resume", action="store_true", help="re-probe everything")
    args = ap.parse_args(argv)
    from types import SimpleNamespace

    return run(SimpleNamespace(input=args.manifest, out_dir=args.out_dir, num_workers=args.workers, resume=not args.no_resume))


def run(cfg) -> int:
    """`avllm prepare` / `scripts/prepare.py` with a composed `conf/prepare.yaml`."""
    report = prepare(cfg.input, cfg.out_dir, num_workers=cfg.num_workers or os.cpu_count(), resume=bool(cfg.resume))
    print(report)
    shards = getattr(cfg, "shards", None)
    if shards is not None and shards.get("out_dir"):
        from nemo_avllm.data.manifest import validate_manifest
        from nemo_avllm.data.shards import write_shards

        samples, vreport = validate_manifest(cfg.input, index=cfg.out_dir)
        print(vreport)
        print(write_shards(samples, shards.out_dir, index=cfg.out_dir, feature_cache=shards.get("feature_cache"),
                           samples_per_shard=int(shards.samples_per_shard)))
    return 0 if report.indexed or not report.total else 1


if __name__ == "__main__":
    sys.exit(main())
