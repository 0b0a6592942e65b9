"""Are two demo runs the same run? `python bench/compare_demo.py OUT_A OUT_B`

Compares two `avllm demo out_dir=...` folders made with the same settings (e.g. before and after a
refactoring): the held-out results and answers byte for byte, every per-step training record
(loss, grad norm, lr, modality counts, consumed samples; timings left out), and every cached
feature tensor. Feature keys and the prepared index name clips by their path, so folders at other
places differ there by name only: tensors are matched by clip name. Exit 0 when all agree."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

TIMINGS = {"tokens_per_s", "step_time_s", "data_wait_s", "compute_s"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in path.read_text().splitlines()]


def _features(folder: Path) -> dict:
    from safetensors.torch import load_file

    clip = re.compile(r"-[0-9a-f]{12}/")  # media id = clip name + a hash of its path
    out = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        out.update({clip.sub("/", k): v for k, v in load_file(shard).items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    a, b = args.a, args.b
    same = True
    for rel in ("results.json", "answers.jsonl"):
        ok = _digest(a / rel) == _digest(b / rel)
        print(f"{rel}: {'identical' if ok else 'DIFFERENT'}")
        same &= ok
    for stage in sorted(p.name for p in (a / "runs").iterdir() if p.is_dir()):
        sa, sb = _steps(a / "runs" / stage / "train_metrics.jsonl"), _steps(b / "runs" / stage / "train_metrics.jsonl")
        ok = sa == sb
        print(f"{stage}: {len(sa)} vs {len(sb)} steps, {'identical' if ok else 'DIFFERENT'} (all fields but timings)")
        if not ok:
            first = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
            print(f"  first difference at record {first + 1}")
        same &= ok
    fa, fb = _features(a / "features"), _features(b / "features")
    ok = fa.keys() == fb.keys() and all(fa[k].dtype == fb[k].dtype and fa[k].equal(fb[k]) for k in fa)
    print(f"features: {len(fa)} vs {len(fb)} tensors, {'identical' if ok else 'DIFFERENT'}")
    same &= ok
    print("the same run" if same else "NOT the same run")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
