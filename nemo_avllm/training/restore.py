"""Where a training run's initial weights come from; runs whose weights would silently stay
random are refused (paper §3.3: stage 1 starts from the imported LLM, stage 2 from stage 1).

- `model.restore_from`: a dist checkpoint (`avllm import-hf` output, or a stage-1 checkpoint).
  Every LLM tensor must be in it. Projectors: all of them, or none (an LLM-only checkpoint:
  stage 1 trains new projectors, so this needs `projectors` in `model.trainable`). Encoders:
  from the checkpoint when it has them, else from `model.vision/audio.checkpoint`.
- Weights only: the restored checkpoint's optimizer state and schedule are not read (a stage
  starts its own AdamW moments and LR schedule); resuming an interrupted run is the strategy's
  job and loads everything.
- A training checkpoint inside a run folder (stage 2 from stage 1) only when that run recorded that
  it finished at this checkpoint's step (`finished.json`, written at the end of training): a stage 1
  stopped at a time limit and never requeued must not feed stage 2 silently
  (`model.allow_unfinished_restore=true` restores it anyway).
- No `model.restore_from` (null, or stage 2's `???`): only with `model.allow_random_init=true`
  (tests, the synthetic demo); the same key allows encoders without weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_avllm.errors import UserError
from nemo_avllm.model.provider import ENCODERS, check_encoder_weights
from nemo_avllm.training import checkpoint

PROJECTORS = ("proj_temporal", "proj_spatial", "proj_audio")
FINISHED = "finished.json"  # in a run folder: the run reached its last step (`write_finished`)


def write_finished(run_dir, step: int, max_steps: int) -> Path:
    """The record that a run reached its last step (rank 0, at the end of training)."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": int(step), "max_steps": int(max_steps)}))
    tmp.replace(path)
    return path


def clear_finished(run_dir, rank_zero: bool = True) -> None:
    """Forget the record when a run (re)starts in its folder; `write_finished` puts it back at its end."""
    if rank_zero:
        (Path(run_dir) / FINISHED).unlink(missing_ok=True)


def check_finished(ckpt: Path, model_cfg) -> None:
    """Refuse a checkpoint of a training run folder (`<run>/checkpoints/<name>`) whose run did not
    record that it finished at this checkpoint's step; also a run folder itself (no intact
    checkpoint in it to resolve to) without the record."""
    ckpt = Path(ckpt)
    if model_cfg.get("allow_unfinished_restore", False):
        return
    if ckpt.parent.name == "checkpoints":
        record, m = ckpt.parent.parent / FINISHED, re.search(r"step[=_](\d+)", ckpt.name)
    elif (ckpt / "checkpoints").is_dir():
        record, m = ckpt / FINISHED, None
    else:
        return
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        done = None
    if done is not None and (m is None or int(m.group(1)) == int(done.get("step", -1))):
        return
    why = (f"its run recorded finishing at step {done.get('step')}" if done is not None
           else f"its run did not record finishing ({record} is missing: stopped at a time limit or failed)")
    raise UserError(f"model.restore_from={ckpt} is not the end of a finished run: {why}; finish that run "
                    f"(resubmit it: it resumes), or set model.allow_unfinished_restore=true to restore it anyway")


@dataclass
class RestorePlan:
    path: str | None  # checkpoint to load the weights from; None: keep the initial weights
    allow_missing: tuple[str, ...] = ()  # name prefixes the checkpoint may lack (`checkpoint.load`)


def _restore_from(model_cfg) -> str | None:
    if isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, "restore_from"):
        return None
    return model_cfg.get("restore_from") or None


def plan(model_cfg, files: bool = True) -> RestorePlan:
    """Check where the weights of `model_cfg` come from (no model is built); raises UserError
    naming the key to set when some would stay random without `model.allow_random_init=true`.
    `files=False` checks only that the keys are set (a launcher on a submit host, where the
    checkpoint lives on the cluster or is written by an earlier stage)."""
    path = _restore_from(model_cfg)
    trainable = list(model_cfg.get("trainable", []))
    if path is None:
        if not model_cfg.get("allow_random_init", False):
            if "llm" in trainable:
                raise UserError(
                    "model.restore_from is not set: stage 2 starts from the stage-1 checkpoint; set "
                    "model.restore_from=<exp_dir>/avllm_stage1_pretrain/checkpoints/<name>-last, or "
                    "model.allow_random_init=true to train from random weights on purpose"
                )
            raise UserError(
                "model.restore_from is not set: stage 1 starts from the imported LLM; run "
                "`avllm import-hf hf_dir=<vicuna-7b-v1.5 folder> out=<dir>` and set model.restore_from=<dir>, "
                "or model.allow_random_init=true to train from a random LLM on purpose"
            )
        return RestorePlan(None)
    if not files:
        return RestorePlan(str(path))
    path = checkpoint.resolve(path)  # a run folder means its last checkpoint
    if not checkpoint.is_checkpoint(path):
        raise UserError(
            f"model.restore_from={path} is not a dist checkpoint folder (no metadata.json) nor a run folder "
            f"with a *-last checkpoint; give an `avllm import-hf` output, a training checkpoint folder "
            f"(<name>--step_N-last) or its run folder"
        )
    check_finished(path, model_cfg)
    parts = checkpoint.saved_parts(path)
    if "llm" not in parts:
        raise UserError(f"model.restore_from={path} holds no LLM weights (llm.*); give an `avllm import-hf` "
                         f"output or a training checkpoint")
    allow = [f"{name}." for name in ENCODERS if name not in parts]  # from their own checkpoints
    if not parts & set(PROJECTORS):
        if "projectors" not in trainable:
            raise UserError(
                f"model.restore_from={path} holds no projector weights (an imported LLM), but "
                f"model.trainable={trainable} keeps the projectors frozen at random values; start stage 2 "
                f"from a stage-1 checkpoint, or add projectors to model.trainable"
            )
        allow.append("proj_")  # an imported LLM: stage 1 trains new projectors
    check_encoder_weights(model_cfg, provided=tuple(n for n in ENCODERS if n in parts))
    return RestorePlan(str(path), tuple(allow))


def restore(restore_plan: RestorePlan, module) -> None:
    """Load the planned weights into `module` (before the optimizer takes its fp32 copies)."""
    if restore_plan.path is not None:
        checkpoint.load(restore_plan.path, module, allow_missing=restore_plan.allow_missing)
