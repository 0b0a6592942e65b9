"""On-disk cache of one curation run, one folder per video: `<cache_dir>/<media id>/<name>.json`.

Names carry a digest of everything the entry depends on (the captioner config and the file's size
and mtime for captions; model, prompt version and the exact messages for LLM replies), so a
changed input, model or prompt makes a new entry and an unchanged one is reused: a killed or
repeated run resumes where it stopped (`nemo_avllm.runtime.disk_cache`).
"""

from __future__ import annotations

from pathlib import Path

from nemo_avllm.runtime.disk_cache import JsonDir, digest  # noqa: F401 (digest re-exported)


class VideoCache(JsonDir):
    """The cache folder of one video."""

    def __init__(self, root, media_id: str):
        super().__init__(Path(root) / media_id)
