"""One run per run folder, and a resume that survives damaged checkpoints and failed saves.

`prepare(cfg)` runs before exp_manager (global rank 0 does the file work):
- takes the run folder's lock (`<run>/.lock/owner.json`: pid, host, process start time). A second
  run on the same folder is refused in one line naming the holder; a lock whose process is gone
  (same host, pid dead or reused) is taken over with a warning. A holder on another host cannot
  be checked: the message says so and how to free the folder. A folder, not a file: NeMo moves
  the run folder's files into `run_N/` when a run resumes.
- puts back checkpoints whose replacement was killed between its two renames, and removes the
  leftovers of failed saves (`*.tmp-*`, `*.old-*`): under the lock nobody else is saving there.
- picks the newest checkpoint that loads (`checkpoint.newest_intact`): a damaged `*-last` is
  reported with its failing file and set aside (`<name>.damaged`), and the run resumes from the
  newest intact one, saying which; NeMo's "no checkpoints found" then appears only when there
  are none."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from nemo_avllm.errors import UserError
from nemo_avllm.runtime.processes import process_gone, start_time

log = logging.getLogger(__name__)

LOCK = ".lock"


class RunFolderBusyError(UserError):
    """Another run holds the run folder's lock."""


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": start_time(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunLock:
    """The lock folder of one run folder, held by this process between `acquire` and `release`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads((self.path / "owner.json").read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = _owner()
        staging = self.run_dir / f"{LOCK}-{me['pid']}-{me['host']}"
        staging.mkdir(exist_ok=True)
        (staging / "owner.json").write_text(json.dumps(me))
        try:
            for _ in range(100):
                try:
                    os.rename(staging, self.path)  # atomic; fails while another owner's lock is there
                    self.held = True
                    return
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                held = self.holder()
                if held is None:  # a lock being written or removed right now
                    time.sleep(0.05)
                    continue
                mine = (held["pid"], held["host"]) == (me["pid"], me["host"])  # an earlier train() here
                if not mine and not process_gone(int(held["pid"]), held["host"], held.get("start")):
                    where = "this host" if held["host"] == me["host"] else f"host {held['host']}"
                    raise RunFolderBusyError(
                        f"run folder {self.run_dir} is in use by pid {held['pid']} on {where} (since "
                        f"{held.get('since', '?')}): one run per run folder; wait for it, give another "
                        f"exp_manager.exp_dir / name, or remove {self.path} if that process is gone")
                stale = self.path.with_name(f"{LOCK}.stale-{me['pid']}")
                try:
                    os.rename(self.path, stale)  # one taker wins
                except OSError:
                    continue
                shutil.rmtree(stale, ignore_errors=True)
                log.warning("run folder %s: took over the lock of pid %s on %s, which is gone", self.run_dir,
                            held["pid"], held["host"])
            raise RunFolderBusyError(f"run folder {self.run_dir}: could not take {self.path}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def release(self) -> None:
        if self.held:
            held = self.holder()
            if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
                shutil.rmtree(self.path, ignore_errors=True)
            self.held = False


def _global_rank() -> int:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class PreparedRun:
    """What `prepare` decided: the lock to release and the checkpoint to resume from."""

    def __init__(self, lock: RunLock | None, resume_from: Path | None = None):
        self.lock, self.resume_from = lock, resume_from

    def exp_manager(self, trainer, em_cfg):
        """NeMo's exp_manager, told to resume from `resume_from` when that is not the `*-last`
        NeMo finds itself (its "no checkpoints found" would be false then)."""
        from nemo.utils.exp_manager import exp_manager
        from omegaconf import open_dict

        if self.resume_from is None or em_cfg is None:
            return exp_manager(trainer, em_cfg)
        em_cfg = em_cfg.copy()
        with open_dict(em_cfg):
            em_cfg.resume_from_checkpoint = str(self.resume_from)
        quiet = _DropMessage("There were no checkpoints found")
        nemo_log = logging.getLogger("nemo_logger")
        nemo_log.addFilter(quiet)
        try:
            return exp_manager(trainer, em_cfg)
        finally:
            nemo_log.removeFilter(quiet)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def prepare(cfg) -> PreparedRun:
    """Lock the run folder of `cfg` (exp_manager.exp_dir/name), recover and clean its checkpoint
    folder and pick the checkpoint to resume from (see the module docstring)."""
    import atexit

    from nemo_avllm.training import checkpoint

    em = cfg.get("exp_manager") or {}
    if not (em.get("exp_dir") and em.get("name")):
        return PreparedRun(None)
    run_dir = Path(em.exp_dir) / em.name
    ckpt_dir = Path((em.get("checkpoint_callback_params") or {}).get("dirpath") or run_dir / "checkpoints")
    resuming = em.get("resume_if_exists", False) and not em.get("resume_from_checkpoint")
    if _global_rank() != 0:  # rank 0 sets damaged *-last folders aside; see the same choice
        chosen, damaged = checkpoint.newest_intact(checkpoint.candidates(ckpt_dir)) if resuming else (None, [])
        for _ in range(600):
            if not any(p.exists() for p, _ in damaged if p.name.endswith("-last")):
                break
            time.sleep(0.1)
        return PreparedRun(None, chosen if chosen is not None and not chosen.name.endswith("-last") else None)
    lock = RunLock(run_dir)
    lock.acquire()
    atexit.register(lock.release)
    for p in checkpoint.recover_interrupted_saves(ckpt_dir):
        log.warning("recovered checkpoint %s from an interrupted save", p)
    for p in checkpoint.failed_saves(ckpt_dir):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.warning("removed %s, left by a save that did not finish", p)
    if not resuming:
        return PreparedRun(lock)
    chosen, damaged = checkpoint.newest_intact(checkpoint.candidates(ckpt_dir))
    for p, why in damaged:
        log.warning("checkpoint %s is damaged and not used: %s", p, why)
        if p.name.endswith("-last"):  # NeMo would pick it: set it aside, kept for inspection
            p.rename(p.with_name(f"{p.name}.damaged"))
    if chosen is not None and damaged:
        log.warning("resuming from %s, the newest intact checkpoint", chosen)
    return PreparedRun(lock, chosen if chosen is not None and not chosen.name.endswith("-last") else None)
