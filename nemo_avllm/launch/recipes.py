"""NeMo-Run recipes: one plain function per training stage, returning the `run.Script` a NeMo-Run
executor runs (the same `avllm train` entry point users run by hand), and the two-stage sequence.

    import nemo_run as run
    from nemo_avllm.launch import executors, recipes

    s1 = recipes.stage1_pretrain(["model.data.train_manifest=/data/desc.jsonl"], nodes=2, gpus_per_node=8,
                                 exp_dir="/lustre/avllm/runs")
    with run.Experiment("avllm") as exp:
        exp.add(s1, executor=executors.slurm_executor(...), name="stage1")
        exp.run(detach=True)

Every override is a Hydra override of `conf/stage1_pretrain.yaml` / `conf/stage2_finetune.yaml`;
the recipe adds the process layout (`trainer.num_nodes`, `trainer.devices`) and the run folder
(`exp_manager.exp_dir`) so that the executor's process count and the trainer always agree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nemo_avllm.errors import UserError

from nemo_avllm.launch.overrides import format_value

STAGE_CONFIGS = {"stage1": "stage1_pretrain", "stage2": "stage2_finetune"}
DEFAULT_NAMES = {"stage1": "avllm_stage1_pretrain", "stage2": "avllm_stage2_finetune"}
ENTRY_MODULE = "nemo_avllm.cli"  # `python -m nemo_avllm.cli train ...` = `avllm train ...`


@dataclass(frozen=True)
class Stage:
    """One training job of a recipe: its name in the experiment and its `avllm train` arguments."""

    name: str
    config_name: str
    overrides: tuple[str, ...]
    run_name: str  # the run folder's name under exp_dir (the config's `name`)

    @property
    def argv(self) -> list[str]:
        return ["train", "--config-name", self.config_name, *self.overrides]

    def script(self, env: dict[str, str] | None = None, quote: bool = False):
        """The NeMo-Run task. `quote=True` shell-quotes arguments (SLURM puts them in a script;
        the local executor passes them as a list)."""
        import shlex

        import nemo_run as run

        args = [shlex.quote(a) for a in self.argv] if quote else list(self.argv)
        return run.Script(path=ENTRY_MODULE, m=True, entrypoint="python", args=args,
                          env=dict(env or {}, PYTHONUNBUFFERED="1"))


def _layout(nodes: int, gpus_per_node: int, exp_dir: str | os.PathLike) -> list[str]:
    if int(nodes) < 1 or int(gpus_per_node) < 1:
        raise UserError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must both be >= 1")
    return [f"trainer.num_nodes={int(nodes)}", f"trainer.devices={int(gpus_per_node)}",
            f"exp_manager.exp_dir={format_value(str(exp_dir))}"]


def run_name(overrides, stage: str) -> str:
    """The run folder name a stage's overrides give (`name=...`), else the config's default."""
    names = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.startswith(("name=", "+name="))]
    return names[-1] if names else DEFAULT_NAMES[stage]


def stage1_pretrain(overrides=(), nodes: int = 1, gpus_per_node: int = 8,
                    exp_dir: str | os.PathLike = "checkpoints/runs") -> Stage:
    """Stage 1 (projectors on audio-visual descriptions), paper §3.3."""
    ov = (*overrides, *_layout(nodes, gpus_per_node, exp_dir))
    return Stage("stage1", STAGE_CONFIGS["stage1"], ov, run_name(ov, "stage1"))


def stage2_finetune(restore_from: str | os.PathLike, overrides=(), nodes: int = 1, gpus_per_node: int = 8,
                    exp_dir: str | os.PathLike = "checkpoints/runs") -> Stage:
    """Stage 2 (projectors + LLM on instructions), restored from a stage-1 checkpoint or run folder
    (a run folder means its last checkpoint, found when the job starts)."""
    if not restore_from:
        raise UserError("stage 2 needs restore_from: a stage-1 checkpoint folder or stage-1 run folder "
                         "(<exp_dir>/avllm_stage1_pretrain); set stage2.model.restore_from=...")
    ov = (*overrides, f"model.restore_from={format_value(str(restore_from))}", *_layout(nodes, gpus_per_node, exp_dir))
    return Stage("stage2", STAGE_CONFIGS["stage2"], ov, run_name(ov, "stage2"))


def two_stage(stage1_overrides=(), stage2_overrides=(), nodes: int = 1, gpus_per_node: int = 8,
              exp_dir: str | os.PathLike = "checkpoints/runs", stage2_nodes: int | None = None) -> list[Stage]:
    """Stage 1 then stage 2, stage 2 restoring from stage 1's run folder (its last checkpoint).
    Add them to one experiment with stage 2 depending on stage 1 (`launch.run.experiment`)."""
    s1 = stage1_pretrain(stage1_overrides, nodes, gpus_per_node, exp_dir)
    s2 = stage2_finetune(Path(exp_dir) / s1.run_name, stage2_overrides, stage2_nodes or nodes, gpus_per_node, exp_dir)
    return [s1, s2]
