"""A dist checkpoint is data: a crafted one never runs code, through any reader, and is refused in
one line naming the file (issue 24, fault 1)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_avllm import config
from nemo_avllm.training import checkpoint, safe_load
from tests.conftest import REPO


class _Payload:
    """What an attacker plants: unpickling it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture(scope="module")
def stage_checkpoint(tmp_path_factory, dist1) -> Path:
    """A real stage checkpoint of the tiny model (what users hand around)."""
    from nemo_avllm.model.provider import build_model

    cfg = config.load_model("tiny")
    path = tmp_path_factory.mktemp("stage") / "ckpt"
    checkpoint.save(path, build_model(cfg), common={"cfg": cfg})
    return path


def _crafted_metadata(src: Path, dst: Path, marker: Path) -> Path:
    """`src` with a payload planted in its `.metadata` (torch pickles `Metadata` whole)."""
    import shutil

    shutil.copytree(src, dst)
    with open(src / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own file, written just now
    md.planner_data = _Payload(marker)
    with open(dst / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return dst


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nemo_avllm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.parametrize("task", ["restore_from", "export-hf"])
def test_crafted_metadata_never_runs(stage_checkpoint, tmp_path, task):
    marker = tmp_path / "marker"
    ckpt = _crafted_metadata(stage_checkpoint, tmp_path / "ckpt", marker)
    if task == "restore_from":
        proc = _cli("train", "model=tiny", f"model.restore_from={ckpt}", "model.trainable=[projectors,llm]",
                    f"exp_manager.exp_dir={tmp_path / 'exp'}", "trainer.max_steps=1")
    else:
        proc = _cli("export-hf", f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}")
    out = proc.stdout + proc.stderr
    assert not marker.exists(), out[-3000:]
    assert proc.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert f"{ckpt / '.metadata'}: refused" in last and "builtins.exec" in last, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_crafted_stored_object_never_runs(tmp_path, dist1):
    """The common state and RNG states are stored objects (torch-pickled): read with
    weights_only, a payload there is refused naming the data file."""
    from megatron.core import dist_checkpointing

    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save({checkpoint.COMMON_KEY: {"step": 1, "x": _Payload(marker)}}, str(ckpt))
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"__0_0\.distcp: refused: object 'common_state.* holds .*exec"):
        checkpoint.load_common(ckpt)
    assert not marker.exists()


def test_own_checkpoints_hold_only_plain_data(stage_checkpoint):
    """What the project saves besides tensors (config, RNG, loop state) reads back as plain data."""
    common = checkpoint.load_common(stage_checkpoint)
    assert isinstance(common["cfg"], dict) and checkpoint.model_config(stage_checkpoint).llm.num_layers > 0
