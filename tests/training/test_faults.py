"""Faults: exact resume after SIGKILL, kill during a save, SIGTERM, NaN/inf policy."""

from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from nemo_avllm.training import checkpoint
from nemo_avllm.training.callbacks import read_metrics
from tests.conftest import REPO
from tests.training import helpers
from tests.training.conftest import DROPOUT, media_run_args


def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    # dropout on: bit-exact only if the checkpoint restores every RNG stream
    helpers.run(helpers.overrides(tmp_path / "a", steps=8, **DROPOUT))
    ref = helpers.losses_by_step(tmp_path / "a" / "run")
    assert sorted(ref) == list(range(1, 9))

    args = helpers.overrides(tmp_path / "b", steps=8, **DROPOUT)
    proc = helpers.start(args)
    helpers.wait_for_step(tmp_path / "b" / "run", 5, proc)
    helpers.kill(proc, signal.SIGKILL)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert any(n.endswith("-last") for n in ckpts), ckpts
    _, out = helpers.run(args)  # same command: resume_if_exists picks up the last checkpoint
    assert "Resuming training from checkpoint" in out
    got = helpers.losses_by_step(tmp_path / "b" / "run")  # the resumed run's steps
    assert max(got) == 8 and min(got) in (5, 6), sorted(got)  # resumed from the step-4 checkpoint
    for step in got:
        assert got[step] == ref[step], (step, got[step], ref[step])  # bit-exact on CPU
    # checkpoint folders: no '=' in a name (typed on a command line as is), one -last, and the
    # top-k (save_top_k=2) of both runs together: the resumed run pruned what the first one kept
    names = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert all("=" not in n for n in names) and [n for n in names if n.endswith("-last")] == ["run--step_8-last"], names
    assert len([n for n in names if not n.endswith("-last")]) == 2, names


_SAVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from nemo_avllm import config
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training import checkpoint
    distributed.initialize(1, 1, seed=3)
    model = build_model(config.load_model("tiny"))
    for step in range(1, 10000):
        for p in model.proj_audio.parameters():
            p.data.fill_(float(step))
        checkpoint.save({path!r}, model, None, {{"step": step}})
        print("saved", step, flush=True)
    """
)


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, dist1):
    from nemo_avllm import config
    from nemo_avllm.model.provider import build_model

    path = tmp_path / "ckpt-last"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(repo=str(REPO), path=str(path)))
    model = build_model(config.load_model("tiny"))
    rng = random.Random(0)
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        saved = 0
        for line in proc.stdout:  # wait for a few complete saves
            saved = int(line.split()[1])
            if saved >= 2:
                break
        import time

        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside a later save
        helpers.kill(proc)
        checkpoint.recover_interrupted_saves(tmp_path)
        assert checkpoint.is_checkpoint(path), sorted(p.name for p in tmp_path.iterdir())
        common = checkpoint.load(path, model)
        step = common["step"]
        assert step >= saved
        assert float(model.proj_audio.linear.weight[0, 0]) == float(step)  # weights of that same save


def test_sigterm_writes_a_final_checkpoint(tmp_path):
    proc = helpers.start(helpers.overrides(tmp_path, steps=200, every=1000))
    helpers.wait_for_step(tmp_path / "run", 3, proc)
    out = helpers.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, out[-3000:]
    last = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith("-last")]
    assert len(last) == 1 and checkpoint.is_checkpoint(last[0])
    step = checkpoint.load_common(last[0])["lightning"]["global_step"]
    logged = max(helpers.losses_by_step(tmp_path / "run"))
    assert step == logged >= 3


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_loss_policy(tmp_path, policy):
    # sample 6 is a <VIS> sample (6 % 3 == 0) in global batch 2: NaN video -> NaN loss at step 2
    args = helpers.overrides(tmp_path, steps=4, every=1000, **{"model.nan_policy": policy})
    code, out = helpers.run(args, nan_at=6, check=False)
    assert "non-finite loss nan at step 1" in out  # global_step counts from 0 inside the step
    metrics = helpers.losses_by_step(tmp_path / "run")
    if policy == "skip":
        assert code == 0, out[-3000:]
        assert "skipping the optimizer step" in out
        assert sorted(metrics) == [1, 2, 3, 4] and math.isnan(metrics[2])
        assert all(math.isfinite(metrics[s]) for s in (1, 3, 4))
    else:
        assert code != 0
        assert "NonFiniteLossError" in out and "model.nan_policy=stop" in out
        assert sorted(metrics) == [1]


def test_non_finite_gradients_are_skipped_then_stop_the_run(tmp_path):
    """A finite loss with NaN gradients: step 2 skipped (weights untouched, training goes on),
    then steps 4 and 5 skipped in a row, and the third bad step in a row stops the run
    (model.max_consecutive_skipped_steps=2). Samples 6, 14, 18, 22 are in steps 2, 4, 5, 6."""
    args = helpers.overrides(tmp_path, steps=8, every=1000, **{"model.max_consecutive_skipped_steps": 2})
    code, out = helpers.run(args, nan_grad_at=(6, 14, 18, 22), check=False)
    assert code != 0
    assert "non-finite gradients" in out and "skipping the optimizer step" in out
    assert "3 steps in a row (steps 3 to 5)" in out and "model.max_consecutive_skipped_steps=2" in out
    metrics = {m["step"]: m for m in read_metrics(tmp_path / "run")}
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    assert all(math.isfinite(metrics[s]["reduced_train_loss"]) for s in metrics)  # the loss never was NaN
    assert [s for s in metrics if math.isnan(metrics[s]["grad_norm"])] == [2, 4, 5]
    assert metrics[3]["grad_norm"] > 0 and metrics[5]["skipped_steps"] == 3


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, media_data, tokenizer_dir, media_reference_run):
    """SLURM signals the whole process group: the DataLoader workers (live decoding) must leave
    it to the main process, which checkpoints the last step, exits 0 and resumes bit-exactly
    (dropout on: the RNG states travel in the checkpoint)."""
    ref = {m["step"]: m for m in read_metrics(media_reference_run)}
    assert sorted(ref) == list(range(1, 7))

    args = media_run_args(tmp_path, media_data, tokenizer_dir)
    proc = helpers.start(args, real_data=True)
    helpers.wait_for_step(tmp_path / "run", 3, proc)  # after the step-2 save (its writer process exists)
    out = helpers.kill(proc, signal.SIGTERM)  # os.killpg: main process, forkserver, workers, writer
    assert proc.returncode == 0, out[-4000:]
    assert "exited unexpectedly" not in out
    last = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith("-last")]
    assert len(last) == 1 and checkpoint.is_checkpoint(last[0])
    stopped = checkpoint.load_common(last[0])["lightning"]["global_step"]
    assert stopped == max(helpers.losses_by_step(tmp_path / "run")) < 6

    _, out = helpers.run(args, real_data=True)
    assert "Resuming training from checkpoint" in out
    got = {m["step"]: m for m in read_metrics(tmp_path / "run")}  # the resumed run's steps
    assert sorted(got) == list(range(stopped + 1, 7))
    for step in got:  # training and validation losses, bit for bit
        for key in ("reduced_train_loss", "val_loss"):
            assert got[step].get(key) == ref[step].get(key), (step, key, got[step].get(key), ref[step].get(key))
