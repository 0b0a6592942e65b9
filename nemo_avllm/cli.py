"""`avllm TASK [--config-name NAME] [key=value ...]`: one command for every task.

Each task composes its Hydra config from `conf/` (NeMo style overrides) and calls the same
function as `scripts/TASK.py`."""

from __future__ import annotations

import importlib
import sys

# task -> (function "module:attr", default config name)
TASKS = {
    "train": ("nemo_avllm.training.train:main", "stage1_pretrain"),
    "prepare": ("nemo_avllm.data.prepare:run", "prepare"),
    "features": ("nemo_avllm.data.features:run", "features"),
    "demo": ("nemo_avllm.demo.run:main", "demo"),
    "import-hf": ("nemo_avllm.export.import_hf:run", "import_hf"),
    "export-hf": ("nemo_avllm.export.export_hf:run", "export_hf"),
    "launch": ("nemo_avllm.launch.run:main", "launch"),
    "curate": ("nemo_avllm.curation.pipeline:run", "curate"),
    "generate": ("nemo_avllm.inference.run:generate", "generate"),
    "chat": ("nemo_avllm.inference.run:chat", "generate"),
    "evaluate": ("nemo_avllm.evaluation.run:main", "evaluate"),
}

USAGE = f"""usage: avllm TASK [--config-name NAME] [key=value ...]

tasks: {", ".join(TASKS)}

examples:
  avllm demo
  avllm prepare input=data/train.jsonl out_dir=data/prepared
  avllm train --config-name stage2_finetune model.restore_from=<stage-1 checkpoint folder>
"""


def split_args(argv: list[str], default_config: str) -> tuple[str, list[str]]:
    """`--config-name X` / `-cn X` / `--config-name=X` and the remaining Hydra overrides."""
    name, rest, i = default_config, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config-name", "-cn"):
            if i + 1 >= len(argv):
                raise SystemExit(f"{a} needs a config name")
            name, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config-name="):
            name = a.split("=", 1)[1]
        elif "=" in a or a.startswith(("+", "~")):
            rest.append(a)
        else:
            raise SystemExit(f"unexpected argument {a!r}: overrides look like key=value\n\n{USAGE}")
        i += 1
    return name, rest


def run_task(task: str, cfg):
    module, attr = TASKS[task][0].split(":")
    return getattr(importlib.import_module(module), attr)(cfg)


def hydra_main(task: str):
    """The `scripts/TASK.py` entry point: NeMo's `hydra_runner` over `conf/` for one task."""
    from nemo.core.config import hydra_runner

    from nemo_avllm.config import conf_dir

    @hydra_runner(config_path=str(conf_dir()), config_name=TASKS[task][1])
    def main(cfg) -> None:
        run_task(task, cfg)

    return main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"unknown task {task!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    name, overrides = split_args(rest, TASKS[task][1])
    from nemo_avllm import config

    result = run_task(task, config.load(name, overrides))
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
