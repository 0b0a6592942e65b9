"""Launch training runs as real processes (so they can be killed) and read their metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nemo_avllm.training.callbacks import read_metrics
from tests.conftest import REPO, torchrun_cmd

RUNNER = REPO / "tests" / "training" / "run_train.py"


def overrides(exp_dir: Path, steps: int, every: int = 2, name: str = "run", **extra) -> list[str]:
    base = {
        "trainer.devices": 1,
        "trainer.max_steps": steps,
        "trainer.enable_progress_bar": "false",
        "trainer.log_every_n_steps": 1,
        "model.micro_batch_size": 2,
        "model.global_batch_size": 4,
        "model.seq_length": 64,
        "model.trainable": "[projectors,llm]",
        "model.optim.lr": 1e-3,
        "model.allow_random_init": "true",  # the tiny test model has no pretrained weights
        "exp_manager.exp_dir": str(exp_dir),
        "name": name,
        "exp_manager.create_tensorboard_logger": "false",
        "exp_manager.checkpoint_callback_params.every_n_train_steps": every,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def start(args: list[str], nproc: int = 1, nan_at: int | None = None, real_data: bool = False,
          nan_grad_at: tuple[int, ...] = (), mat: bool = False) -> subprocess.Popen:
    """A training run in its own process group (as SLURM starts one). `real_data`: `avllm train`
    on the manifest in `args` (the real media loader), else run_train.py on SyntheticData
    (`mat`: its micro-batches from the real MAT sampler)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    pre = ["--nan-at", str(nan_at)] if nan_at is not None else []
    pre += ["--nan-grad-at", ",".join(map(str, nan_grad_at))] if nan_grad_at else []
    pre += ["--mat"] if mat else []
    if real_data:
        cmd = [sys.executable, "-m", "nemo_avllm.cli", "train", "model=tiny", *args]
    elif nproc == 1:
        cmd = [sys.executable, str(RUNNER), *pre, *args]
    else:
        cmd = [*torchrun_cmd(nproc), str(RUNNER), *pre, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run(args: list[str], nproc: int = 1, nan_at: int | None = None, timeout: int = 600, check: bool = True,
        real_data: bool = False, nan_grad_at: tuple[int, ...] = (), mat: bool = False):
    proc = start(args, nproc, nan_at, real_data, nan_grad_at, mat)
    out, _ = proc.communicate(timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training run failed ({proc.returncode}):\n{out[-8000:]}")
    return proc.returncode, out


def wait_for_step(log_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(m["step"] >= step for m in read_metrics(log_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-5000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> str:
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    return out


def losses_by_step(log_dir: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps it redid)."""
    return {m["step"]: m["reduced_train_loss"] for m in read_metrics(log_dir)}
