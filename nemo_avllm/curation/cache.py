"""On-disk cache of one curation run, one folder per video: `<cache_dir>/<media id>/<name>.json`.

Names carry a digest of everything the entry depends on (the captioner config and the file's size
and mtime for captions; model, prompt version and the exact messages for LLM replies), so a
changed input, model or prompt makes a new entry and an unchanged one is reused: a killed or
repeated run resumes where it stopped. Writes go to a temp file renamed into place, so a kill
never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def digest(obj, n: int = 16) -> str:
    """Stable short hash of any JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class VideoCache:
    """The cache folder of one video."""

    def __init__(self, root, media_id: str):
        self.dir = Path(root) / media_id

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str):
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            return None  # a damaged entry is recomputed

    def put(self, name: str, value) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(name)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False))
        os.replace(tmp, p)
