"""NeMo-Run executors for the recipes: local torchrun, and SLURM with a pyxis/enroot container.

SLURM runs one task per GPU (`srun`, `--ntasks-per-node` = GPUs), as NeMo's Megatron recipes do;
`nemo_avllm.runtime.distributed` reads the SLURM variables. `--signal=TERM@120` makes every
rank receive SIGTERM two minutes before the time limit: training writes a checkpoint and exits 0,
the job requeues itself until its run records that it finished (`REQUEUE_UNFINISHED`) and the next
allocation resumes from that checkpoint (`exp_manager.resume_if_exists`)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from nemo_avllm.errors import UserError


def local_executor(gpus_per_node: int = 1, env: dict[str, str] | None = None):
    """torchrun on this machine with `gpus_per_node` processes (gloo on CPU, nccl on GPUs); on one
    node NeMo-Run's torchrun lets the rendezvous pick a free port."""
    import nemo_run as run

    # the torchrun (and python) of this interpreter's environment, also when it is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return run.LocalExecutor(ntasks_per_node=int(gpus_per_node), launcher=run.Torchrun(),
                             env_vars={"PATH": path, **(env or {})})


def container_mounts(mounts, *paths) -> list[str]:
    """`mounts` plus `p:p` for each path not already inside a mount (run folders must be shared)."""
    out = [str(m) for m in mounts or []]
    targets = [m.split(":")[1] if ":" in m else m for m in out]
    for p in paths:
        p = os.path.abspath(str(p))
        if not any(p == t or p.startswith(t.rstrip("/") + "/") for t in targets):
            out.append(f"{p}:{p}")
            targets.append(p)
    return out


# NeMo-Run requeues failed jobs only; a job whose ranks saved on the time-limit SIGTERM ends with 0.
# These lines (sbatch setup) requeue a job whose training ended with 0 without recording that it
# finished (`finished.json` in its run folder, written at the last step), so the run resumes in the
# next allocation (`exp_manager.resume_if_exists`). When that requeue cannot happen (MAX requeues
# reached, scontrol failing) the job exits 1: a stage 2 waiting on it (afterok) never starts.
REQUEUE_UNFINISHED = r"""
avllm_requeue_unfinished() {
  local rc=$?
  if [ "$rc" != 0 ] || [ -e {finished} ]; then return; fi
  if [ "${SLURM_RESTART_COUNT:-0}" -lt {max_requeues} ] && scontrol requeue "$SLURM_JOB_ID"; then
    echo "[avllm] training stopped before its last step (no {finished}): requeued job $SLURM_JOB_ID"
  else
    echo "[avllm] error: training stopped before its last step and job $SLURM_JOB_ID was not requeued (restart ${SLURM_RESTART_COUNT:-0}, max {max_requeues}): exit 1, so that jobs after it do not start" >&2
    exit 1
  fi
}
trap avllm_requeue_unfinished EXIT
"""


def requeue_lines(finished: str | None, max_requeues: int = 20) -> str | None:
    """`REQUEUE_UNFINISHED` for a run whose finished record is `finished` (None: no requeue lines)."""
    if not finished:
        return None
    return REQUEUE_UNFINISHED.replace("{finished}", shlex.quote(str(finished))).replace("{max_requeues}", str(int(max_requeues)))


def cpus_per_task(stage_cfg) -> int:
    """Cores one rank needs: its own process plus one per DataLoader worker (a worker decodes with
    one thread: `data.workers.loader_worker_init`)."""
    data = stage_cfg.model.get("data") or {}
    return int(data.get("num_workers") or 0) + 1


def check_image(image: str | None) -> None:
    """The image is set, and a file image (an absolute path) exists where this host sees its folder."""
    if not image:
        raise UserError("slurm.container_image is not set: give the image built from this repo's Dockerfile "
                        "(e.g. nvcr.io#myorg/nemo_avllm:latest or /lustre/images/nemo_avllm.sqsh)")
    p = Path(str(image))
    if p.is_absolute() and Path("/", *p.parts[1:2]).exists() and not p.exists():
        raise UserError(f"slurm.container_image={image} does not exist; build it (docs/cluster.md, \"Container\") or fix the path")


def slurm_executor(*, account: str, partition: str | None, nodes: int, gpus_per_node: int, container_image: str,
                   container_mounts: list[str], time: str = "04:00:00", job_dir: str, host: str | None = None,
                   user: str | None = None, exclusive: bool = True, signal: str = "TERM@120", retries: int = 0,
                   code: str = "image", env: dict[str, str] | None = None, srun_args: list[str] | None = None,
                   cpus_per_task: int | None = None, finished: str | None = None):
    """`sbatch` on the cluster (from this host when it is a login node, else over SSH to `host`).

    `finished`: the run's finished record; the job requeues itself until it exists (`REQUEUE_UNFINISHED`).
    `code=image` runs the package installed in the container (built from this repo's Dockerfile);
    `code=git` ships this checkout's committed tree (NeMo-Run's GitArchivePackager) and puts it
    first on PYTHONPATH."""
    import nemo_run as run

    check_image(container_image)
    if not account:
        raise UserError("slurm.account is not set: give your SLURM account (sbatch --account)")
    if code not in ("image", "git"):
        raise UserError(f"slurm.code={code!r}: expected image (the container's package) or git (this checkout)")
    env = dict(env or {})
    packager = run.Packager()
    if code == "git":
        packager = run.GitArchivePackager()
        env["PYTHONPATH"] = "/nemo_run/code"
    tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=job_dir) if host \
        else run.LocalTunnel(job_dir=job_dir)
    return run.SlurmExecutor(
        account=account, partition=partition or None, nodes=int(nodes), ntasks_per_node=int(gpus_per_node),
        gpus_per_node=int(gpus_per_node), time=str(time), exclusive=bool(exclusive) or None, signal=signal or None,
        container_image=container_image, container_mounts=list(container_mounts), job_name_prefix="avllm-",
        retries=int(retries), env_vars=env, srun_args=list(srun_args or []) or None, packager=packager, tunnel=tunnel,
        cpus_per_task=int(cpus_per_task) if cpus_per_task else None, setup_lines=requeue_lines(finished),
    )
