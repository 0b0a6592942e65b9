"""Faults of a long run's folder (issue 24): two runs on one folder, damaged checkpoints, leftovers
of failed saves. Real training processes, real dist checkpoints damaged by hand."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

from nemo_avllm.training import checkpoint
from tests.training import helpers


def test_a_second_run_on_the_same_folder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    first = helpers.start(helpers.overrides(tmp_path, steps=200, every=1000))
    try:
        helpers.wait_for_step(tmp_path / "run", 1, first)
        code, out = helpers.run(helpers.overrides(tmp_path, steps=2, every=1000), check=False)
        assert code != 0
        last = out.strip().splitlines()[-1]
        assert f"is in use by pid {first.pid} on this host" in last, out[-3000:]
        assert first.poll() is None  # the first run goes on
    finally:
        helpers.kill(first, signal.SIGKILL)  # its lock stays behind
    assert (tmp_path / "run" / ".lock").is_dir()
    _, out = helpers.run(helpers.overrides(tmp_path, steps=1, every=1000))
    assert f"took over the lock of pid {first.pid} on {socket.gethostname()}, which is gone" in out
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_resume_skips_damaged_checkpoints_naming_their_files(tmp_path):
    helpers.run(helpers.overrides(tmp_path, steps=4, every=2))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["run--step_2", "run--step_4", "run--step_4-last"]
    distcp = ckpts / "run--step_4-last" / "__0_0.distcp"
    with open(distcp, "r+b") as f:
        f.truncate(distcp.stat().st_size // 2)  # a save cut short by the file system
    (ckpts / "run--step_4" / "metadata.json").write_text("")
    leftover = ckpts / "run--step_6-last.tmp-1-gone"  # what a killed save leaves
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"\0" * (1 << 20))

    _, out = helpers.run(helpers.overrides(tmp_path, steps=5, every=2))
    assert f"{distcp}: truncated" in out and f"{ckpts / 'run--step_4' / 'metadata.json'}: damaged" in out
    assert f"resuming from {ckpts / 'run--step_2'}, the newest intact checkpoint" in out
    assert "no checkpoints found" not in out
    assert f"removed {leftover}" in out and not leftover.exists()
    assert sorted(helpers.losses_by_step(tmp_path / "run")) == [3, 4, 5]  # resumed after step 2
    assert (ckpts / "run--step_4-last.damaged").is_dir()  # set aside, not deleted


def test_a_save_removes_only_leftovers_whose_owner_is_gone(tmp_path, dist1):
    from nemo_avllm import config
    from nemo_avllm.model.provider import build_model

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = tmp_path / f"ck.tmp-{os.getppid()}-{host}"  # another process saving the same name now
    gone = tmp_path / f"ck.tmp-{int(dead.stdout)}-{host}"
    live.mkdir()
    gone.mkdir()
    checkpoint.save(tmp_path / "ck", build_model(config.load_model("tiny")))
    assert live.is_dir() and not gone.exists() and checkpoint.is_checkpoint(tmp_path / "ck")


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoints(tmp_path):
    """A real full disk: the run folder on a 31 MiB tmpfs (a private mount namespace) holds the
    two step-2 checkpoints (~12 MiB each) but not a third."""
    import shlex

    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a small file system here (unshare -rm: {probe.stderr.strip()})")
    exp, keep = tmp_path / "exp", tmp_path / "kept"
    exp.mkdir()
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, str(helpers.RUNNER), *helpers.overrides(exp, steps=4, every=2)])
    script = f"mount -t tmpfs -o size=31m tmpfs {exp} && {{ {cmd} > {tmp_path / 'out.txt'} 2>&1; echo $? > {tmp_path / 'rc'}; cp -r {exp} {keep}; }}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(helpers.REPO), HF_HUB_OFFLINE="1")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=helpers.REPO, timeout=600, check=True)
    out = (tmp_path / "out.txt").read_text()
    assert (tmp_path / "rc").read_text().strip() != "0"
    assert re.search(rf"DiskFullError: not enough disk space to save checkpoint {exp}/run/checkpoints/run--step_4\S*: "
                     rf"it needs \d+ MiB free in {exp}/run/checkpoints, \d+ MiB are", out), out[-3000:]
    assert "Worker failure" not in out
    ckpts = keep / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["run--step_2", "run--step_2-last"]
    assert all(checkpoint.safe_load.damage(p) is None for p in ckpts.iterdir() if p.is_dir())
    assert [p.name for p in checkpoint.failed_saves(ckpts)] == ["run--step_4-unfinished"]  # removed at the next start
