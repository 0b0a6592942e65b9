"""The `prepare` step: probe every video once, write a 48 kHz mono FLAC side-car of its audio,
and an index that training, `features` and the DALI pipelines read instead of re-probing.

Outputs in `out_dir` (formats and the one reader: `index`):
- `index.jsonl`: one JSON line per good video: `path`, `id`, the probe fields of
  `media.MediaInfo` (num_frames, fps, duration, width, height, rotation, video_codec, container,
  is_image, audio_channels/audio_sample_rate/audio_codec of the audio source), `audio_path` (the
  manifest's separate audio file or null), `flac` (absolute side-car path or null), `has_audio`
  (a side-car exists), `audio_seconds`, and `stamp`/`audio_stamp` ([size, mtime_ns], for resume);
- `audio/<id>.flac`: 48 kHz mono 16-bit FLAC (DALI's audio decoder reads FLAC, not AAC),
  streamed: decoded, resampled and written chunk by chunk, so memory does not grow with the
  track's length;
- `bad_files.jsonl`: an `index.bad_record` for every file that failed and every manifest line
  that could not be used (FILE:LINE, what is wrong, the fix), so one bad input never stops a run.

Runs on a process pool over all cores, with a progress bar. Index lines are appended and flushed
one by one, so a killed run leaves a valid index (a torn last line is ignored on reading) and the
next run resumes: videos whose size and mtime are unchanged are skipped. At the end the index is
rewritten (temp file + rename) with one line per input video, in input order.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import soundfile as sf
from tqdm import tqdm

from nemo_avllm.data.decode_pyav import iter_audio, probe, probe_audio
from nemo_avllm.data.index import BAD_FILES_NAME, INDEX_NAME, MediaIndex, bad_record, file_stamp
from nemo_avllm.data.manifest import ManifestProblem, MediaItem, read_inputs
from nemo_avllm.media import SAMPLE_RATE, MediaError
from nemo_avllm.data.workers import pool_worker_start, worker_context

log = logging.getLogger(__name__)

AUDIO_DIR = "audio"
SHOWN_PROBLEMS = 20  # bad manifest lines logged one by one; all of them go to bad_files.jsonl
FLAC_BLOCK = 1 << 16  # samples buffered per FLAC write


@dataclass
class PrepareReport:
    """Counts of one `prepare` run."""

    total: int  # distinct videos in the input
    prepared: int  # probed (and side-car written) in this run
    skipped: int  # already in the index and unchanged (resume)
    failed: int  # files listed in bad_files.jsonl
    with_audio: int  # index entries that have a FLAC side-car
    index_path: str
    bad_files_path: str
    elapsed_s: float
    dropped_lines: int = 0  # manifest lines left out (invalid JSON, no video, ...), in bad_files.jsonl

    @property
    def indexed(self) -> int:
        return self.prepared + self.skipped

    def __str__(self) -> str:
        return (
            f"prepare: {self.total} videos, {self.prepared} prepared, {self.skipped} unchanged (skipped), "
            f"{self.failed} bad, {self.dropped_lines} manifest lines dropped (see {self.bad_files_path}), "
            f"{self.with_audio} with audio; index {self.index_path}; {self.elapsed_s:.1f} s"
        )


def write_flac(path: Path, chunks: Iterable[np.ndarray], sample_rate: int = SAMPLE_RATE) -> int:
    """Stream mono float chunks into a 16-bit FLAC, FLAC_BLOCK samples at a time (memory does not
    grow with the track), under a temp name renamed at the end so a kill never leaves half a file.
    Returns the samples written; with none, no file is left."""
    tmp = path.with_name(path.name + ".tmp")
    written, block, pending, out = 0, [], 0, None
    try:
        for chunk in itertools.chain(chunks, [None]):  # None: write the last, partial block
            if chunk is not None:
                block.append(chunk)
                pending += len(chunk)
            if pending and (pending >= FLAC_BLOCK or chunk is None):
                if out is None:
                    out = sf.SoundFile(tmp, "w", sample_rate, 1, subtype="PCM_16", format="FLAC")
                out.write(np.clip(np.concatenate(block), -1.0, 1.0))
                written, block, pending = written + pending, [], 0
    except BaseException:
        if out is not None:
            out.close()
        tmp.unlink(missing_ok=True)
        raise
    if out is None:
        return 0
    out.close()
    os.replace(tmp, path)
    return written


def prepare_one(item: MediaItem, audio_dir: str) -> dict:
    """Probe one video and write its side-car. Never raises: returns {"ok": bool, ...}."""
    try:
        stamp = file_stamp(item.video) if os.path.isfile(item.video) else None
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
            flac_path = Path(audio_dir) / f"{item.id}.flac"
            samples = write_flac(flac_path, iter_audio(src, SAMPLE_RATE))
            if samples:
                flac, seconds = str(flac_path), round(samples / SAMPLE_RATE, 6)
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
            audio_stamp=file_stamp(item.audio),
        )
        return {"ok": True, "record": record}
    except MediaError as e:
        return {"ok": False, "path": e.path, "item": item, "reason": e.reason}
    except Exception as e:  # a crash on one file must not stop the run
        return {"ok": False, "path": item.video, "item": item, "reason": f"{type(e).__name__}: {e}"}


def _work(args):
    return prepare_one(*args)


def _unchanged(rec: dict, item: MediaItem) -> bool:
    try:
        if rec.get("stamp") != file_stamp(item.video) or rec.get("audio_stamp") != file_stamp(item.audio):
            return False
    except OSError:
        return False
    return rec.get("flac") is None or os.path.isfile(rec["flac"])


def _append(f, obj: dict) -> None:
    f.write(json.dumps(obj) + "\n")
    f.flush()


def _report_lines(problems: list[ManifestProblem], bad_f) -> None:
    """Bad manifest lines: logged (the first SHOWN_PROBLEMS) and written to bad_files.jsonl."""
    for k, p in enumerate(problems):
        if k < SHOWN_PROBLEMS:
            log.warning("prepare: %s; line left out", p)
        _append(bad_f, bad_record(p.file, p.what, line=p.line))
    if len(problems) > SHOWN_PROBLEMS:
        log.warning("prepare: %d more bad manifest lines in %s", len(problems) - SHOWN_PROBLEMS, bad_f.name)


def prepare(
    source,
    out_dir,
    num_workers: int | None = os.cpu_count(),
    resume: bool = True,
    progress: bool = True,
) -> PrepareReport:
    """Probe + FLAC side-car + index for every video of `source` (manifest path(s) or list of paths).

    Bad files and unusable manifest lines go to `out_dir/bad_files.jsonl` and are left out of the
    index; the run goes on. With `resume`, videos already indexed with unchanged size+mtime are
    skipped.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    audio_dir = out / AUDIO_DIR
    audio_dir.mkdir(parents=True, exist_ok=True)
    index_path, bad_path = out / INDEX_NAME, out / BAD_FILES_NAME
    problems: list[ManifestProblem] = []
    items = read_inputs(source, problems)

    previous = MediaIndex.load(index_path, missing_ok=True).records if resume else {}
    records: dict[str, dict] = {}
    todo: list[MediaItem] = []
    for item in items:
        rec = previous.get(item.id)
        if rec is not None and _unchanged(rec, item):
            records[item.id] = rec
        else:
            todo.append(item)
    skipped = len(records)

    failed = prepared = 0
    workers = max(1, min(num_workers or 1, len(todo)))
    jobs = [(item, str(audio_dir)) for item in todo]
    with open(index_path, "a" if resume else "w") as index_f, open(bad_path, "w") as bad_f:
        _report_lines(problems, bad_f)
        bar = tqdm(total=len(todo), desc="prepare", unit="video", disable=not progress)
        pool = None
        try:
            if workers > 1:
                pool = worker_context().Pool(workers, initializer=pool_worker_start)
                results: Iterable[dict] = pool.imap_unordered(_work, jobs, chunksize=1)
            else:
                results = map(_work, jobs)
            for res in results:
                if res["ok"]:
                    rec = res["record"]
                    records[rec["id"]] = rec
                    _append(index_f, rec)
                    prepared += 1
                else:
                    item = res["item"]
                    _append(bad_f, bad_record(item.video, res["reason"], file=res["path"], media_id=item.id))
                    failed += 1
                bar.update(1)
                bar.set_postfix(bad=failed, refresh=False)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()

    # Compact: one line per input video, input order; temp + rename keeps it valid throughout.
    ordered = [records[i.id] for i in items if i.id in records]
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
        dropped_lines=len(problems),
    )
