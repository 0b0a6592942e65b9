"""Runs `nemo_avllm.training.train.train` on SyntheticData in its own process (kill/resume tests).

Usage: python run_train.py [--nan-at N] [--nan-grad-at N,M,...] [--mat] key=value ...
(Hydra overrides of stage1_pretrain; see SyntheticData for the two faults and --mat)"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
    from nemo_avllm import config
    from nemo_avllm.training.train import train
    from tests.training.deterministic_data import SyntheticData

    nan_at, nan_grad_at, mat = None, (), False
    while argv and argv[0] in ("--nan-at", "--nan-grad-at", "--mat"):
        if argv[0] == "--mat":
            mat, argv = True, argv[1:]
            continue
        if argv[0] == "--nan-at":
            nan_at = int(argv[1])
        else:
            nan_grad_at = tuple(int(x) for x in argv[1].split(","))
        argv = argv[2:]
    cfg = config.load("stage1_pretrain", ["model=tiny", "model.data.train_manifest=null", *argv])
    train(cfg, data=SyntheticData(seq_length=int(cfg.model.seq_length), nan_at_sample=nan_at,
                                  nan_grad_at_samples=nan_grad_at, mat=mat))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
