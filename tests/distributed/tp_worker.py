"""Worker for the tensor-parallel data and projector tests (2 gloo processes under torchrun).

`--mode sp`: projectors under sequence parallelism at TP=2 keep the batch dimension and equal the
full (unsharded) linear map. `--mode broadcast`: at TP=2 only TP rank 0 reads a micro-batch and
the other rank receives it; at PP=2 each stage keeps only what it uses. `--mode init`: at TP=2 the
projectors' initial weights, with CPU and with GPU initialisation, are the TP=1 ones (xavier over
the whole matrix). Failures raise."""

from __future__ import annotations

import argparse
import sys

import torch


def check_sp_projector() -> None:
    from megatron.core.transformer import TransformerConfig

    from nemo_avllm.model.projector import Projector
    from nemo_avllm.runtime import distributed

    distributed.initialize(2, 1, seed=1)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=2, tensor_model_parallel_size=2,
                               sequence_parallel=True, use_cpu_initialization=True)
    proj = Projector(32, 64, config)
    assert config.sequence_parallel  # the LLM's config keeps sequence parallelism
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = proj(x)
    assert out.shape == (3, 5, 64), f"projector output {tuple(out.shape)}, expected (3, 5, 64)"
    w = [torch.empty_like(proj.linear.weight) for _ in range(2)]
    b = [torch.empty_like(proj.linear.bias) for _ in range(2)]
    torch.distributed.all_gather(w, proj.linear.weight.detach())
    torch.distributed.all_gather(b, proj.linear.bias.detach())
    ref = x.detach() @ torch.cat(w).T + torch.cat(b)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    assert proj.linear.weight.grad.shape == (32, 32)
    distributed.destroy()


def check_projector_init() -> None:
    from megatron.core.transformer import TransformerConfig
    from torch import nn

    from nemo_avllm.model.projector import Projector
    from nemo_avllm.runtime import distributed

    distributed.initialize(2, 1, seed=1)
    torch.manual_seed(7)
    want = nn.init.xavier_uniform_(torch.empty(64, 32))  # what TP=1 draws
    for cpu_init in (True, False):
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=2, tensor_model_parallel_size=2,
                                   use_cpu_initialization=cpu_init)
        torch.manual_seed(7)
        proj = Projector(32, 64, config)
        w = [torch.empty_like(proj.linear.weight) for _ in range(2)]
        torch.distributed.all_gather(w, proj.linear.weight.detach())
        got = torch.cat(w)
        assert torch.equal(got, want), f"cpu_init={cpu_init}: TP=2 weights differ from TP=1 by {(got - want).abs().max()}"
    distributed.destroy()


def _batch() -> dict:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 50, (2, 8), generator=g)
    return {
        "input_ids": torch.randint(0, 50, (2, 8), generator=g),
        "labels": labels,
        "loss_mask": labels > 10,
        "video": torch.randn(2, 4, 3, 8, 8, generator=g),
        "features": {"temporal": torch.randn(2, 4, 6, generator=g), "spatial": None, "audio": torch.randn(2, 2, 6, generator=g)},
        "ids": ["a", "b"],
        "modality": ["V", "AV"],
        "bad_media": [],
    }


def check_broadcast() -> None:
    from megatron.core import parallel_state as ps

    from nemo_avllm.runtime import distributed
    from nemo_avllm.training import broadcast

    distributed.initialize(2, 1)
    rank = torch.distributed.get_rank()
    assert broadcast.reads_data() == (rank == 0)
    full = _batch()
    got = broadcast.stage_batch(full if rank == 0 else None, torch.device("cpu"))
    # media stay on TP rank 0, which runs the encoders for the group
    media = ["video"] if rank == 0 else []
    assert sorted(got) == sorted(k for k in full if k != "video" or media), sorted(got)
    for k in ("input_ids", "labels", "loss_mask", *media):
        assert got[k].dtype == full[k].dtype and torch.equal(got[k], full[k]), k
    assert sorted(got["features"]) == ["audio", "temporal"]
    assert torch.equal(got["features"]["temporal"], full["features"]["temporal"])
    assert got["ids"] == ["a", "b"] and got["modality"] == ["V", "AV"]

    ps.destroy_model_parallel()  # same two processes as two pipeline stages
    distributed.initialize(1, 2)
    assert broadcast.reads_data()  # TP rank 0 of the first and of the last stage
    got = broadcast.stage_batch(full, torch.device("cpu"))
    if ps.is_pipeline_first_stage():
        assert sorted(got) == ["bad_media", "features", "ids", "input_ids", "modality", "video"], sorted(got)
    else:
        assert sorted(got) == ["labels", "loss_mask"], sorted(got)
    distributed.destroy()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["sp", "broadcast", "init"], required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    {"sp": check_sp_projector, "broadcast": check_broadcast, "init": check_projector_init}[args.mode]()
    print(f"rank {torch.distributed.get_rank() if torch.distributed.is_initialized() else '-'}: {args.mode} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
