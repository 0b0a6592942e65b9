"""A folder of JSON entries, written atomically, and the stable digest that names them.

Entry names carry a digest of everything the entry depends on, so a changed input, model or
prompt makes a new entry and an unchanged one is reused: a killed or repeated run resumes where
it stopped. Writes go to a temp file renamed into place, so a kill never leaves a half-written
entry. Used by the curation's per-video cache and by every OpenAI-compatible client call
(`nemo_avllm.runtime.openai_client`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def digest(obj, n: int = 16) -> str:
    """Stable short hash of any JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class JsonDir:
    """`<dir>/<name>.json` entries."""

    def __init__(self, folder):
        self.dir = Path(folder)

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
