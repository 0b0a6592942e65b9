"""Distributed start-up: the one place that turns a launcher's environment into process groups.

Reads torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM
(`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODELIST`) variables, falls back to a
single local process, initialises torch.distributed (nccl with a GPU, gloo without), then
megatron-core's `parallel_state` with TP/PP sizes, and seeds every RNG the way Megatron does.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from nemo_avllm.runtime import cpu_compat

# NCCL/gloo collective timeout (`trainer.dist_timeout_minutes`): a hung rank ends the job after it
DEFAULT_TIMEOUT_MINUTES = 30


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "local"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as `gpu[003-007,9],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: dict | None = None) -> LaunchEnv:
    """Which launcher started us, and where the rendezvous is."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")),
            # a port derived from the job id, so every task of the job agrees on it
            master_port=int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "local")


def check_launch(processes: int, env: LaunchEnv | None = None) -> None:
    """One process per rank must already be running (torchrun, srun, `avllm launch`): a
    single-process start asking for several devices would leave Lightning to spawn them, which
    sets no `RANK` (every process would be rank 0 on GPU 0)."""
    env = read_launch_env() if env is None else env
    if env.world_size == processes:
        return
    if env.launcher == "local":
        raise ValueError(
            f"trainer.devices x trainer.num_nodes = {processes} processes, but this is a single process: start one "
            f"process per device with `torchrun --nproc-per-node {processes} scripts/train.py ...`, `srun` under "
            f"SLURM, or `avllm launch` (or set trainer.devices=1)")
    raise ValueError(
        f"{env.launcher} started {env.world_size} processes but trainer.devices x trainer.num_nodes = {processes}; "
        f"make them agree (e.g. trainer.devices={env.world_size} on one node)")


def cuda_device_index(local_rank: int, count: int | None = None) -> int:
    """This rank's GPU: its local rank when the process sees every GPU of its node, 0 when it
    sees exactly one (SLURM binding one GPU per task through CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count() if count is None else count
    if count == 1:
        return 0
    if 0 <= local_rank < count:
        return local_rank
    raise RuntimeError(
        f"local rank {local_rank} but this process sees {count} GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most one process per visible GPU")


def cuda_env(tensor_model_parallel_size: int) -> dict[str, str]:
    """Environment megatron needs before CUDA starts: with tensor parallelism (and sequence
    parallelism, which needs it), one hardware queue per device, so the TP communication
    kernels run in the order they were issued and overlap with compute as scheduled."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if int(tensor_model_parallel_size) > 1 else {}


def has_gpu() -> bool:
    return torch.cuda.is_available() and not cpu_compat.is_applied()


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's RNG trackers (TP ranks differ, PP stages differ)."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> LaunchEnv:
    """Initialise torch.distributed and megatron-core model parallel state (idempotent).
    `timeout_minutes`: how long a collective may wait (`trainer.dist_timeout_minutes`)."""
    from megatron.core import parallel_state

    timeout_minutes = check_timeout(timeout_minutes)
    for key, value in cuda_env(tensor_model_parallel_size).items():
        if os.environ.get(key) != value and torch.cuda.is_initialized():
            logging.getLogger(__name__).warning("%s=%s is needed before CUDA starts; it started already", key, value)
        os.environ.setdefault(key, value)

    gpu = torch.cuda.is_available()
    if not gpu:
        cpu_compat.apply()
    env = read_launch_env()
    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    if env.world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {env.world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}); launch tp*pp*dp processes "
            f"(e.g. torchrun --nproc-per-node {tp * pp})"
        )
    if not torch.distributed.is_initialized():
        if gpu:
            torch.cuda.set_device(cuda_device_index(env.local_rank))
        torch.distributed.init_process_group(
            backend="nccl" if gpu else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != tp
            or parallel_state.get_pipeline_model_parallel_world_size() != pp
        ):
            raise RuntimeError("model parallel state already initialised with other TP/PP sizes; call destroy() first")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=timeout_minutes,
        )
    set_seed(seed)
    return env


def check_timeout(minutes) -> float:
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise ValueError(f"trainer.dist_timeout_minutes={minutes!r}: give a positive number of minutes")
    return value


def destroy() -> None:
    """Tear down model parallel state and the process group (tests, re-initialisation)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
