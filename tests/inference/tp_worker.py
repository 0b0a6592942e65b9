"""torchrun worker: load a dist checkpoint at the launch's TP and greedy-generate for the prompts
and media in `--inputs` (torch file); TP rank 0 writes the new tokens to `--out` (JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from nemo_avllm.inference.backends import MegatronBackend
    from nemo_avllm.inference.engine import SamplingConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    a = ap.parse_args()
    inp = torch.load(a.inputs, weights_only=True)
    backend = MegatronBackend(a.ckpt, tensor_model_parallel_size=a.tp)
    feats = backend.features(inp["prompts"], inp["video"], inp["audio"])
    gens = backend.generate(inp["prompts"], feats, SamplingConfig(max_new_tokens=inp["max_new_tokens"]))
    if torch.distributed.get_rank() == 0:
        Path(a.out).write_text(json.dumps([g.tokens for g in gens]))


if __name__ == "__main__":
    main()
