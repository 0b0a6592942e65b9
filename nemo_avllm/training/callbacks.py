"""Training callbacks that are ours (NeMo's exp_manager provides loggers and checkpointing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class MetricsJsonl(Callback):
    """Appends one JSON line per optimizer step to `<log_dir>/train_metrics.jsonl` (rank 0):
    step, loss, lr, grad norm, tokens/s, samples per modality, and the data-stall telemetry
    (`data_wait_s`: time the step waited for the loader, `compute_s`: the rest). Easy to diff
    across runs and commits, and what the resume tests compare. At the end of training the
    stall totals are logged and written to `<log_dir>/data_stall.json`."""

    def __init__(self, log_dir: str | Path):
        self.path = Path(log_dir) / "train_metrics.jsonl"
        self.waits: list[float] = []
        self.computes: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = getattr(pl_module, "last_metrics", None)
        if trainer.is_global_zero and metrics:
            self.waits.append(float(metrics.get("data_wait_s", 0.0)))
            self.computes.append(float(metrics.get("compute_s", 0.0)))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")
                f.flush()

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero or not self.waits:
            return
        summary = data_stall_summary(self.waits, self.computes)
        (self.path.parent / "data_stall.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("data stall over %d steps: waited %.2f s for data, computed %.2f s (%.1f %% of step time waiting; "
                 "slowest wait %.3f s)", summary["steps"], summary["data_wait_s"], summary["compute_s"],
                 100 * summary["stall_fraction"], summary["max_wait_s"])


def data_stall_summary(waits: list[float], computes: list[float]) -> dict:
    """Totals of the per-step data-stall telemetry: is the loader keeping up?"""
    wait, compute = sum(waits), sum(computes)
    ordered = sorted(waits)
    return {"steps": len(waits), "data_wait_s": wait, "compute_s": compute,
            "stall_fraction": wait / (wait + compute) if wait + compute > 0 else 0.0,
            "median_wait_s": ordered[len(ordered) // 2], "max_wait_s": ordered[-1]}


def read_metrics(log_dir: str | Path) -> list[dict]:
    path = Path(log_dir) / "train_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class LastCheckpointAtEnd(Callback):
    """Writes the `*-last` checkpoint at the end of training when NeMo's checkpoint callback did
    not: it skips that save when the step count divides `val_check_interval` (1.0), i.e. after a
    1-step run (`trainer.max_steps=1`), which would leave a smoke test with no checkpoint.
    Runs after the checkpoint callback (appended after exp_manager)."""

    def on_train_end(self, trainer, pl_module):
        ckpt = trainer.checkpoint_callback
        if ckpt is None or not ckpt.save_last or trainer.global_step == 0:
            return
        candidates = ckpt._monitor_candidates(trainer)
        if ckpt.last_model_path != ckpt.format_checkpoint_name(candidates, ckpt.CHECKPOINT_NAME_LAST):
            ckpt._save_last_checkpoint(trainer, candidates)
