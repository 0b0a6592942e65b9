"""`avllm prepare`: the prepare step (`prepare`), then, with `shards.out_dir`, webdataset shards
of the validated manifest (`shards`). A command of its own because it runs both steps; the steps
themselves import nothing above them."""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace
from typing import Sequence

from nemo_avllm.data.features import FeatureCache
from nemo_avllm.data.manifest_checks import validate_manifest
from nemo_avllm.data.prepare import prepare
from nemo_avllm.data.shard_writer import write_shards


def run(cfg) -> int:
    """`avllm prepare` / `scripts/prepare.py` with a composed `conf/prepare.yaml`."""
    report = prepare(cfg.input, cfg.out_dir, num_workers=cfg.num_workers or os.cpu_count(), resume=bool(cfg.resume))
    print(report)
    shards = getattr(cfg, "shards", None)
    if shards is not None and shards.get("out_dir"):
        samples, vreport = validate_manifest(cfg.input, index=cfg.out_dir)
        print(vreport)
        cache = FeatureCache(shards.feature_cache) if shards.get("feature_cache") else None
        print(write_shards(samples, shards.out_dir, index=cfg.out_dir, feature_cache=cache,
                           samples_per_shard=int(shards.samples_per_shard)))
    return 0 if report.indexed or not report.total else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nemo_avllm.data.prepare_cli MANIFEST OUT_DIR [--workers N] [--no-resume]`."""
    ap = argparse.ArgumentParser(description="probe videos once, write FLAC side-cars and the prepare index")
    ap.add_argument("manifest", help="JSON Lines manifest ('video', optional 'audio') or a text file of paths")
    ap.add_argument("out_dir")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-resume", action="store_true", help="re-probe everything")
    args = ap.parse_args(argv)
    return run(SimpleNamespace(input=args.manifest, out_dir=args.out_dir, num_workers=args.workers,
                               resume=not args.no_resume))


if __name__ == "__main__":
    sys.exit(main())
