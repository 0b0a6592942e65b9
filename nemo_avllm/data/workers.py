"""How the data's worker processes start and answer signals: DataLoader workers (training,
validation, shards) and the `prepare` process pool.

Both start from one forkserver (Python keeps one per process): a child forked from a process that
has already decoded video (PyAV/swscale threads) deadlocks in its first frame conversion, and a
DALI/torch process is unsafe to fork. The server imports the data modules once, so workers start
in about a second; it also imports `forkserver_init`, which keeps the server alive through a
process-group SIGTERM (see there)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from functools import partial

import torch

from nemo_avllm.runtime.distributed import cuda_device_index, read_launch_env

# what the forkserver imports once, before it forks any worker
FORKSERVER_PRELOAD = ["nemo_avllm.data.forkserver_init", "nemo_avllm.data.dataset", "nemo_avllm.data.prepare"]


def worker_context():
    """The multiprocessing context of every data worker: the shared forkserver (spawn where
    there is none)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def pool_worker_start() -> None:
    """A `prepare` pool worker answers SIGTERM again: it forks from the shared forkserver, which
    blocks SIGTERM (`forkserver_init`), and `Pool.terminate` stops workers with it. One sent
    while the worker was still starting is pending and ends it here."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def loader_worker_init(_worker_id: int, trainer_pid: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the training process: a scheduler (or Ctrl-C)
    signals the whole process group, the training process handles it (pre-emption checkpoint,
    then exit) and shuts its workers down itself; a worker that died first would crash that with
    "DataLoader worker exited unexpectedly". SIGINT is ignored; SIGTERM is ignored unless the
    training process sends it (`Process.terminate()` when it shuts workers down or exits), which a
    plain SIG_IGN would also refuse, hanging the training process's exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (inherited already) threads started later inherit it
    threading.Thread(target=_exit_on_sigterm_from, args=(trainer_pid,), daemon=True,
                     name="sigterm-from-trainer").start()
    torch.set_num_threads(1)  # decode/resize workers: one core each, no oversubscription
    if torch.cuda.is_available():  # DALI/NVDEC in this worker: this rank's GPU, not GPU 0
        torch.cuda.set_device(worker_gpu())


def worker_gpu(environ: dict | None = None, count: int | None = None) -> int:
    """The GPU of this process's rank on its node (LOCAL_RANK / SLURM_LOCALID; workers inherit
    it), or the one GPU the process sees."""
    return cuda_device_index(read_launch_env(environ).local_rank, count)


def _exit_on_sigterm_from(trainer_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == trainer_pid:
            os._exit(128 + signal.SIGTERM)


def worker_kwargs(num_workers: int) -> dict:
    """DataLoader arguments shared by every loader of the project: workers (see
    `loader_worker_init`, `worker_context`) and a generator of the loader's own. Without one, each
    new iterator (every epoch, every resume) draws its worker seed from the global torch RNG,
    which dropout also draws from: a resumed run would then not repeat the uninterrupted one bit
    for bit."""
    return {
        "num_workers": num_workers,
        "worker_init_fn": partial(loader_worker_init, trainer_pid=os.getpid()) if num_workers else None,
        "multiprocessing_context": worker_context() if num_workers else None,
        "generator": torch.Generator().manual_seed(0),
    }
