"""The runtime: launcher environments, CPU shims for megatron-core, seeding."""

from __future__ import annotations

import os

import pytest
import torch

from nemo_avllm.runtime import cpu_compat, distributed


def test_torchrun_environment():
    env = distributed.read_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    )
    assert env == distributed.LaunchEnv(3, 8, 1, "node7", 1234, "torchrun")


def test_slurm_environment():
    env = distributed.read_launch_env(
        {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[003-004,9]",
         "SLURM_JOB_ID": "4242"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (9, 16, 1, "gpu003", "slurm")
    assert env.master_port == 20000 + 4242
    assert distributed.read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NODELIST": "a1"}).master_addr == "a1"


def test_local_single_process_fallback():
    env = distributed.read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "local") and env.master_port > 0


def test_world_size_must_fit_tp_times_pp(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not divisible"):
        distributed.initialize(tensor_model_parallel_size=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU shims, which are off when a GPU is present")
def test_cpu_shims_are_active_without_gpu(dist1):
    from megatron.core.tensor_parallel import random as mrandom

    assert cpu_compat.is_applied()
    assert torch.cuda.current_device() == torch.device("cpu")
    # literal CUDA devices in megatron code land on the CPU
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert distributed.device().type == "cpu"
    tracker = mrandom.get_cuda_rng_tracker()
    assert "model-parallel-rng" in tracker.get_states()
    # forking the model-parallel stream does not disturb the default stream
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    with tracker.fork():
        inside = torch.rand(3)
    b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, inside)


def test_seeding_is_reproducible(dist1):
    distributed.set_seed(11)
    a = torch.randn(4)
    distributed.set_seed(11)
    assert torch.equal(a, torch.randn(4))


def test_several_devices_need_one_process_each():
    from nemo_avllm.runtime.distributed import LaunchEnv, check_launch, read_launch_env

    with pytest.raises(ValueError, match=r"8 processes, but this is a single process: .*torchrun --nproc-per-node 8"):
        check_launch(8, read_launch_env({"LOCAL_RANK": "0", "WORLD_SIZE": "8"}))  # what Lightning's spawn sets
    with pytest.raises(ValueError, match="torchrun started 2 processes but trainer.devices x trainer.num_nodes = 8"):
        check_launch(8, read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}))
    check_launch(8, LaunchEnv(3, 8, 3, "h", 1, "slurm"))
    check_launch(1, read_launch_env({}))


def test_avllm_train_with_several_devices_and_no_launcher_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", "train", "model=tiny", "trainer.devices=2",
                           "model.allow_random_init=true", "model.data.train_manifest=null", "model.data.shards=null",
                           f"exp_manager.exp_dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "torchrun --nproc-per-node 2" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_tensor_parallelism_gets_one_cuda_connection():
    from nemo_avllm.runtime.distributed import cuda_env

    assert cuda_env(2) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} and cuda_env(1) == {}
