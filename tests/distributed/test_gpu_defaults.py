"""The GPU configuration's code on CPU: the settings `auto` resolves to on a GPU node
(`optim.gpu_defaults`: distributed optimizer, overlapped grad reduce, overlapped param gather),
plus bf16 params and activation recompute, forced on and run over gloo through the real training
entry point at DP=2. MAT micro-batches of one sample each lack a modality (a <VIS> sample has no
audio), the `pt1` schedule switches from audio-visual to single-modality batches at step 3,
the run starts from restored weights and is SIGTERMed and resumed. The numbers equal the
overlap-off, non-distributed-optimizer run's within 1e-6 (fp32)."""

from __future__ import annotations

import signal

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.training import checkpoint, optim
from tests.training import helpers

pytestmark = pytest.mark.distributed
STEPS = 4
TOL = 1e-6


def _gpu_defaults() -> dict:
    return {f"model.{k}": str(v).lower() for k, v in optim.gpu_defaults(config.load("stage1_pretrain").model).items()}


def _args(root, restore, **extra) -> list[str]:
    return helpers.overrides(root, steps=STEPS, every=2, name="run", **{
        "trainer.devices": 2, "model.micro_batch_size": 1, "model.global_batch_size": 4,
        "model.restore_from": restore, "model.data.modality_schedule": "pt1", **extra})


def _weights(ckpt) -> dict[str, torch.Tensor]:
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.provider import build_model

    model = build_model(config.load_model("tiny"))
    checkpoint.load(ckpt, model)
    return {n: t.detach().clone() for n, t in parallel_layout.local_tensors(model).items()}


def _last(run) -> str:
    return str(max(p for p in (run / "checkpoints").glob("*-last") if checkpoint.is_checkpoint(p)))


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    """A one-step run's checkpoint: the weights both runs start from (`model.restore_from`)."""
    root = tmp_path_factory.mktemp("gpu_defaults")
    helpers.run(helpers.overrides(root / "init", steps=1, every=1, name="run"))
    return root, _last(root / "init" / "run")


def test_the_auto_settings_of_a_gpu_node_are_all_on():
    assert _gpu_defaults() == {"model.use_distributed_optimizer": "true", "model.overlap_grad_reduce": "true",
                               "model.overlap_param_gather": "true"}


def test_gpu_defaults_give_the_overlap_off_numbers_across_a_phase_switch_and_a_resume(restored, dist1):
    root, init = restored
    ref_args = _args(root / "ref", init, **{"model.use_distributed_optimizer": "false",
                                            "model.overlap_grad_reduce": "false", "model.overlap_param_gather": "false"})
    helpers.run(ref_args, nproc=2, mat=True)
    ref = {m["step"]: m for m in helpers.read_metrics(root / "ref" / "run")}
    # the pt1 switch: AV-only batches, then single-modality ones (micro-batches without a modality)
    assert [ref[s]["samples_AV"] for s in range(1, STEPS + 1)] == [4, 4, 0, 0], ref

    args = _args(root / "gpu", init, **_gpu_defaults(), **{"model.activations_checkpoint": "true"})
    proc = helpers.start(args, nproc=2, mat=True)
    helpers.wait_for_step(root / "gpu" / "run", 1, proc)
    helpers.kill(proc, signal.SIGTERM)  # the whole process group: checkpoint (distributed optimizer), exit
    got = {m["step"]: m for m in helpers.read_metrics(root / "gpu" / "run")}
    _, out = helpers.run(args, nproc=2, mat=True)
    assert "Resuming training from checkpoint" in out
    resumed = {m["step"]: m for m in helpers.read_metrics(root / "gpu" / "run")}
    assert min(resumed) > 1, sorted(resumed)
    got.update(resumed)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, STEPS + 1):
        for key in ("reduced_train_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=TOL, abs=TOL), (step, key)
    want, have = _weights(_last(root / "ref" / "run")), _weights(_last(root / "gpu" / "run"))
    worst = max(float((have[n] - want[n]).abs().max()) for n in want)
    assert worst <= TOL, worst


def test_gpu_defaults_train_in_bf16_with_recompute(restored):
    root, init = restored
    args = _args(root / "bf16", init, **_gpu_defaults(), **{
        "model.params_dtype": "bf16", "model.activations_checkpoint": "true", "model.data.modality_schedule": "mat"})
    helpers.run(args, nproc=2, mat=True)
    metrics = {m["step"]: m for m in helpers.read_metrics(root / "bf16" / "run")}
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(m["reduced_train_loss"])) and m["skipped_steps"] == 0 for m in metrics.values())
