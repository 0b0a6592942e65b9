"""The prepared index on disk: what `prepare` writes and every later step reads.

One reader (`MediaIndex.load`) and one bad-files format (`bad_record` / `read_bad_files`), so
`prepare`, validation, training, `features` and the shards agree on both. In a prepare folder:
- `index.jsonl`: one JSON line per good video (fields: see `prepare`); later lines for the same
  media id win and a torn last line from a killed run is ignored;
- `bad_files.jsonl`: one `bad_record` per input left out: a file that could not be read, or a
  manifest line that could not be used. The feature cache keeps its failures in the same format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "index.jsonl"
BAD_FILES_NAME = "bad_files.jsonl"


def file_stamp(path: str | None) -> list[int] | None:
    """[size, mtime_ns]: what a resumed step compares to decide a file is unchanged."""
    if path is None:
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def bad_record(path: str, reason: str, *, file: str | None = None, media_id: str | None = None,
               line: int | None = None) -> dict:
    """One line of bad_files.jsonl. `path`: the input left out (a video, or the manifest of a bad
    line); `file`: the file that failed (the video, its separate audio file, or the manifest);
    `line`: the manifest line (bad lines only); `id`: the media id (when known); `reason`: what is
    wrong and what to do."""
    return {"path": path, "file": file or path, "line": line, "id": media_id, "reason": reason}


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file written line by line; a torn line (killed run) is skipped."""
    out = []
    if path.is_file():
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def read_bad_files(path) -> list[dict]:
    """The `bad_record`s of a bad_files.jsonl (or of the one in a folder)."""
    path = Path(path)
    return read_jsonl(path / BAD_FILES_NAME if path.is_dir() else path)


@dataclass
class MediaIndex:
    """`prepare`'s output: index records by media id, and the reasons of the inputs it left out."""

    records: dict[str, dict]
    bad: dict[str, str]  # path (and failing file) -> reason, from bad_files.jsonl
    path: str

    @classmethod
    def load(cls, path, missing_ok: bool = False) -> "MediaIndex":
        """The index of a prepare folder or of an index.jsonl; `missing_ok`: an empty index if absent."""
        path = Path(path)
        index_file = path / INDEX_NAME if path.is_dir() or not path.suffix else path
        if not index_file.is_file() and not missing_ok:
            raise FileNotFoundError(
                f"prepare index {index_file} not found; run `avllm prepare` on the manifest first "
                f"(it writes {INDEX_NAME}) or set data.index=null to probe media while validating"
            )
        records = {r["id"]: r for r in read_jsonl(index_file) if "id" in r and "path" in r}
        bad = {}
        for rec in read_bad_files(index_file.parent / BAD_FILES_NAME):
            for key in {rec.get("path"), rec.get("file")} - {None}:
                bad[key] = rec.get("reason", "unreadable")
        return cls(records, bad, str(index_file))

    def get(self, media_id: str) -> dict | None:
        return self.records.get(media_id)


def as_index(index) -> MediaIndex | None:
    """None, a MediaIndex, or a prepare folder / index.jsonl path -> MediaIndex or None."""
    if index is None or isinstance(index, MediaIndex):
        return index
    return MediaIndex.load(index)


def load_index(path) -> list[dict]:
    """The records of a prepare index (empty if there is none yet), in file order."""
    return list(MediaIndex.load(path, missing_ok=True).records.values())
