"""Loads a checkpoint saved on one GPU or CPU process (distributed optimizer, TP=1) at TP=2 on CPU gloo
processes and compares every weight shard with the full weights; run by torchrun with 2 processes.
Usage: reshard_worker.py CHECKPOINT FULL_WEIGHTS.pt"""

from __future__ import annotations

import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks, whatever the machine has


def main(ckpt: str, full_path: str) -> int:
    import torch
    from megatron.core import parallel_state as ps

    from nemo_avllm import config
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training import checkpoint

    torch.set_num_threads(1)
    distributed.initialize(2, 1)
    cfg = config.load_model("tiny", ["tensor_model_parallel_size=2", "params_dtype=bf16", "build_encoders=false"])
    model = build_model(cfg)
    checkpoint.load(ckpt, model)
    full = torch.load(full_path, weights_only=True)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    params = parallel_layout.local_tensors(model)
    assert set(params) == set(full), sorted(set(params) ^ set(full))[:5]
    for name, t in params.items():
        want = parallel_layout.tp_shard(name, full[name], t, rank, tp)
        assert torch.equal(t.detach().float(), want), name
    print(f"rank {torch.distributed.get_rank()}: {len(params)} tensors resharded to TP=2 and equal")
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
