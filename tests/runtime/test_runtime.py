"""The runtime: launcher environments, CPU shims for megatron-core, seeding."""

from __future__ import annotations

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
