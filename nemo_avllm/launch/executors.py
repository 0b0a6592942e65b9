"""NeMo-Run executors for the recipes: local torchrun, and SLURM with a pyxis/enroot container.

SLURM runs one task per GPU (`srun`, `--ntasks-per-node` = GPUs), as NeMo's Megatron recipes do;
`nemo_avllm.runtime.distributed` reads the SLURM variables. `--signal=TERM@120` makes every
rank receive SIGTERM two minutes before the time limit: training writes a checkpoint and exits 0,
the job requeues itself (`REQUEUE_NEAR_LIMIT`) and the next allocation resumes from that checkpoint
(`exp_manager.resume_if_exists`)."""

from __future__ import annotations

import os
import sys

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
# These lines (sbatch setup) requeue a job that ends successfully within the signal window of its
# time limit, so the run folder resumes in the next allocation (a finished run resumes, sees
# max_steps reached and ends at once). The window is the signal time + 60 s.
REQUEUE_NEAR_LIMIT = r"""
avllm_seconds() {  # squeue %L (D-HH:MM:SS, HH:MM:SS, MM:SS) -> seconds
  local t=$1 d=0 h=0 m=0 s=0 a b c
  case $t in *-*) d=${t%%-*}; t=${t#*-} ;; esac
  IFS=: read -r a b c <<< "$t"
  if [ -n "$c" ]; then h=$a; m=$b; s=$c; elif [ -n "$b" ]; then m=$a; s=$b; else s=$a; fi
  echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}
avllm_requeue_near_limit() {
  local rc=$? left
  left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)
  case $left in ''|*[!0-9:-]*) return ;; esac
  if [ "$rc" = 0 ] && [ "$(avllm_seconds "$left")" -le {window} ] && [ "${SLURM_RESTART_COUNT:-0}" -lt {max_requeues} ]; then
    echo "[avllm] stopped at the time limit after a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}
trap avllm_requeue_near_limit EXIT
"""


def requeue_lines(signal: str | None, max_requeues: int = 20) -> str | None:
    """`REQUEUE_NEAR_LIMIT` for a `--signal` such as `TERM@120` (None without a signal time)."""
    if not signal or "@" not in signal:
        return None
    window = int(signal.rsplit("@", 1)[1]) + 60
    return REQUEUE_NEAR_LIMIT.replace("{window}", str(window)).replace("{max_requeues}", str(max_requeues))


def slurm_executor(*, account: str, partition: str | None, nodes: int, gpus_per_node: int, container_image: str,
                   container_mounts: list[str], time: str = "04:00:00", job_dir: str, host: str | None = None,
                   user: str | None = None, exclusive: bool = True, signal: str = "TERM@120", retries: int = 0,
                   code: str = "image", env: dict[str, str] | None = None, srun_args: list[str] | None = None):
    """`sbatch` on the cluster (from this host when it is a login node, else over SSH to `host`).

    `code=image` runs the package installed in the container (built from this repo's Dockerfile);
    `code=git` ships this checkout's committed tree (NeMo-Run's GitArchivePackager) and puts it
    first on PYTHONPATH."""
    import nemo_run as run

    if not container_image:
        raise UserError("slurm.container_image is not set: give the image built from this repo's Dockerfile "
                         "(e.g. nvcr.io#myorg/nemo_avllm:latest or /lustre/images/nemo_avllm.sqsh)")
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
        setup_lines=requeue_lines(signal),
    )
