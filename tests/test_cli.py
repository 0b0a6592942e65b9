"""The `avllm` command as a user runs it: prepare -> features -> the demo, in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nemo_avllm.cli import split_args
from tests.conftest import REPO

AVLLM = [sys.executable, "-m", "nemo_avllm.cli"]


def _run(args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(AVLLM + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"avllm {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_split_args_reads_config_name_and_overrides():
    assert split_args(["--config-name", "stage2_finetune", "a.b=1", "+x=2"], "d") == ("stage2_finetune", ["a.b=1", "+x=2"])
    assert split_args(["--config-name=s", "k=v"], "d") == ("s", ["k=v"])
    assert split_args(["-cn", "t"], "d") == ("t", [])
    with pytest.raises(SystemExit, match="key=value"):
        split_args(["oops"], "d")


def test_help_and_unknown_task():
    out = subprocess.run(AVLLM + ["--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "tasks:" in out.stdout and "prepare" in out.stdout
    bad = subprocess.run(AVLLM + ["nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task" in bad.stderr


def test_prepare_then_features_from_the_command_line(tmp_path):
    from nemo_avllm.demo import synthetic

    paths = synthetic.generate(tmp_path / "data", 6, 0, seed=3)
    (tmp_path / "data" / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    with open(paths["stage2"], "a") as f:
        f.write(json.dumps({"id": "bad", "video": "videos/broken.mp4",
                            "conversations": [{"from": "human", "value": "<VIS> Hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
    out = _run(["prepare", f"input={paths['stage2']}", f"out_dir={tmp_path / 'prep'}", "num_workers=2",
                f"shards.out_dir={tmp_path / 'shards'}", "shards.samples_per_shard=4"])
    assert "6 prepared" in out and "1 bad" in out
    index = [json.loads(l) for l in (tmp_path / "prep" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 6
    assert "broken.mp4" in (tmp_path / "prep" / "bad_files.jsonl").read_text()
    assert list((tmp_path / "shards").glob("*.tar")) and (tmp_path / "shards" / "shards.json").is_file()
    out = _run(["features", "model=tiny", f"source={tmp_path / 'prep'}", f"index={tmp_path / 'prep'}",
                f"out_dir={tmp_path / 'feat'}", "dtype=fp32", "model.allow_random_init=true"])  # tiny: no weights
    assert "6 encoded" in out
    meta = json.loads((tmp_path / "feat" / "meta.json").read_text())
    assert meta  # hash of the encoder config, T, K, ...


def test_demo_runs_end_to_end(tmp_path):
    """The README's main job, at toy size: data -> stage 1 -> stage 2 -> evaluation table."""
    out = _run(["demo", f"out_dir={tmp_path}", "num_train=40", "num_eval=4", "progress_bar=false",
                "stage1.trainer.max_steps=2", "stage2.trainer.max_steps=3"])
    assert "| question family | chance |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k.split("|")[0] for k in results["accuracy"]} == {"colour", "shape", "motion", "pitch", "loudness", "sync"}
    assert (tmp_path / "results.md").is_file()
    assert list((tmp_path / "runs" / "demo_stage2" / "checkpoints").glob("*-last"))
