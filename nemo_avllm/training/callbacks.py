"""Training callbacks that are ours (NeMo's exp_manager provides loggers and checkpointing)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class MetricsJsonl(Callback):
    """Appends one JSON line per optimizer step to `<log_dir>/train_metrics.jsonl` (rank 0):
    step, loss, lr, grad norm, tokens/s, samples per modality. Easy to diff across runs and
    commits, and what the resume tests compare."""

    def __init__(self, log_dir: str | Path):
        self.path = Path(log_dir) / "train_metrics.jsonl"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = getattr(pl_module, "last_metrics", None)
        if trainer.is_global_zero and metrics:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")
                f.flush()


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
