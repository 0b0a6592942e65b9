"""What `avllm evaluate` settles before any model is loaded, so that a mistake ends in one line
naming the key or file: the benchmark's questions read from its annotation files, their media
checked present, and the run folder bound to what produces its answers (`run.json`: checkpoint and
step, sampling, annotation files and their hashes, prompt settings), so answers of another
checkpoint are never reused."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from omegaconf import OmegaConf

from nemo_avllm.errors import UserError
from nemo_avllm.evaluation import benchmarks

log = logging.getLogger(__name__)


def read_items(bench) -> list[benchmarks.EvalItem]:
    if bench.get("reader") not in benchmarks.READERS:
        raise UserError(f"benchmark.reader={bench.get('reader')}: unknown; choose one of {', '.join(benchmarks.READERS)}")
    kwargs = {k: bench[k] for k in benchmarks.READERS[bench.reader].files if bench.get(k) is not None}
    kwargs.update({k: bench[k] for k in ("video_ext", "subset") if bench.get(k) is not None})
    try:
        items = benchmarks.read(bench.reader, **kwargs)
    except benchmarks.AnnotationError as e:
        raise UserError(f"benchmark.{'/'.join(benchmarks.READERS[bench.reader].files)}: {e}") from e
    if not items:
        raise UserError(f"benchmark.annotations: {kwargs} hold no questions; give the benchmark's annotation file")
    return items


def check_media(bench, items: list[benchmarks.EvalItem]) -> tuple[list, list[str]]:
    """(items whose media exist, missing media paths). None found is the user's mistake (the
    folder, the extension or NExT-QA's mapping): refused, naming the folder and the pattern tried."""
    root = Path(bench.video_root)
    files = lambda it: [root / it.video] + ([root / it.audio] if it.audio else [])  # noqa: E731
    missing = sorted({str(f) for it in items for f in files(it) if not f.is_file()})
    gone = set(missing)
    present = [it for it in items if not any(str(f) in gone for f in files(it))]
    if not present:
        where = (f"benchmark.video_root={root} does not exist" if not root.is_dir() else
                 f"none of the {len(items)} questions' media are under benchmark.video_root={root}")
        hint = "benchmark.video_root, benchmark.video_ext"
        if "mapping" in bench and not bench.get("mapping"):
            hint += ", or benchmark.mapping (NExT-QA's map_vid_vidorID.json for the official <dir>/<id> layout)"
        raise UserError(f"{where} (pattern tried: {root / items[0].video}); set {hint}")
    return present, missing


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(cfg) -> dict:
    """The model a run's answers come from: resolved folder and training step (a step in the
    checkpoint's state, else in its folder name)."""
    if cfg.get("hf"):
        folder = Path(cfg.hf)
        if not (folder / "config.json").is_file():
            raise UserError(f"hf={folder}: not an export-hf folder (no config.json)")
        return {"hf": str(folder.resolve()), "step": None}
    if not cfg.get("checkpoint"):
        raise UserError("give exactly one of checkpoint=<dist checkpoint folder> or hf=<export-hf folder>")
    from nemo_avllm.training import checkpoint as ck

    path = Path(cfg.checkpoint)
    if not ck.is_checkpoint(path):
        raise UserError(f"checkpoint={path}: not a dist checkpoint folder (no metadata.json)")
    step = None
    try:
        step = (ck.load_common(path).get("lightning") or {}).get("global_step")
    except Exception as e:  # noqa: BLE001 (the folder name may still say it)
        log.warning("could not read the step of %s: %s", path, e)
    if step is None:
        m = re.search(r"step[=_](\d+)", path.name)
        step = int(m.group(1)) if m else None
    return {"checkpoint": str(path.resolve()), "step": None if step is None else int(step)}


def run_identity(cfg, model: dict | None = None) -> dict:
    """What produces a run's answers; a run folder holds answers of one identity only."""
    bench = cfg.benchmark
    files = {k: {"path": str(Path(bench[k]).resolve()), "sha256": file_sha256(bench[k])}
             for k in benchmarks.READERS[bench.reader].files if bench.get(k)}
    from nemo_avllm.data.conversation import ConversationTemplate

    return {"model": model or model_identity(cfg),
            "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
            "benchmark": {"name": bench.name, "reader": bench.reader, "files": files, "video_ext": bench.get("video_ext"),
                          "subset": bench.get("subset")},
            "prompt": {"answer_hint": bench.get("answer_hint"), "caption_prompt": bench.get("caption_prompt"),
                       "visual_only": bool(cfg.visual_only), "modality": cfg.get("modality", "auto"),
                       "template": ConversationTemplate().prompt_text([{"from": "human", "value": "{q}"}], True)}}


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {json.dumps(old)} then, {json.dumps(new)} now"]


def bind_run_dir(out: Path, identity: dict) -> None:
    """Refuse a folder whose answers came from anything else (one line naming the difference)."""
    bound = out / "run.json"
    answered = any(f.stat().st_size for f in out.glob("predictions.rank*.jsonl"))
    if bound.is_file():
        diff = _differences(json.loads(bound.read_text()), identity)
        if diff and answered:
            raise UserError(f"{out} holds answers of another run ({'; '.join(diff[:3])}); set run_name=<new name> "
                            f"(or another out_dir), or delete the folder to start over")
    elif answered:
        raise UserError(f"{out} holds answers with no record of the checkpoint and settings that produced them "
                        f"(no run.json); set run_name=<new name> (or another out_dir), or delete the folder")
    out.mkdir(parents=True, exist_ok=True)
    bound.write_text(json.dumps(identity, indent=1))
