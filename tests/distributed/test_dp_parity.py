"""Data and tensor parallelism do not change the numbers of a training step: the same global
batch on 1 rank, on 2 data-parallel ranks and on 2 tensor-parallel ranks gives the same loss,
gradient norm and updated weights (fp32), through the real training entry point (megatron DDP,
finalize_model_grads dividing by the global token count, the megatron optimizer with clipping)."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm.training import checkpoint
from tests.training import helpers

pytestmark = pytest.mark.distributed
TOL = 1e-5
STEPS = 2


def _run(root, name: str, nproc: int, **extra):
    args = helpers.overrides(root / name, steps=STEPS, every=STEPS, name="run", **{"trainer.devices": nproc, **extra})
    helpers.run(args, nproc=nproc)
    metrics = {m["step"]: m for m in helpers.read_metrics(root / name / "run")}
    assert sorted(metrics) == list(range(1, STEPS + 1)), metrics
    last = sorted(p for p in (root / name / "run" / "checkpoints").glob("*-last") if checkpoint.is_checkpoint(p))
    assert last, list((root / name / "run" / "checkpoints").iterdir())
    return metrics, last[-1]


def _weights(ckpt) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors at TP=1 (dist checkpointing reshards a TP=2 save on load)."""
    from nemo_avllm import config
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.provider import build_model

    model = build_model(config.load_model("tiny"))
    checkpoint.load(ckpt, model)
    return {n: t.detach().clone() for n, t in parallel_layout.local_tensors(model).items()}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dp"), "dp1", 1)


@pytest.mark.parametrize("layout", [{}, {"model.tensor_model_parallel_size": 2}], ids=["dp2", "tp2"])
def test_two_ranks_give_the_single_rank_step(single, layout, tmp_path, dist1):
    ref_metrics, ref_ckpt = single
    metrics, ckpt = _run(tmp_path, "two", 2, **layout)
    for step in range(1, STEPS + 1):
        for key in ("reduced_train_loss", "grad_norm"):
            want, got = ref_metrics[step][key], metrics[step][key]
            assert got == pytest.approx(want, rel=TOL, abs=TOL), (step, key, got, want)
        assert metrics[step]["samples_V"] + metrics[step]["samples_A"] + metrics[step]["samples_AV"] == 4
    assert ref_metrics[1]["grad_norm"] > 1.0  # clipped at 1.0: a 1/DP gradient would clip less
    want, got = _weights(ref_ckpt), _weights(ckpt)
    assert want.keys() == got.keys()
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= TOL, worst

