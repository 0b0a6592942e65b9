"""`avllm TASK [--config-name NAME] [key=value ...]`: one command for every task.

`avllm TASK ...` and `python scripts/TASK.py ...` are the same Hydra app over `conf/` (the
settings of NeMo's `hydra_runner`: no `.hydra/` folder, logs to stdout, run dir `.`), so
`--cfg job|hydra|all`, `-m/--multirun`, `--info`, `--config-name` and NeMo-style overrides work
in both. On top of Hydra:
- `--help` lists the task's keys with their current values and their comments from `conf/`;
- an override whose value contains `=` (a checkpoint folder such as `run--step=60-last`) is
  quoted for Hydra, so it can be typed as is;
- a user's mistake (unknown key, bad value, missing file, ...) ends in one line naming the key or
  file, what is wrong and what to do, with exit code 2; `--debug` or HYDRA_FULL_ERROR=1 shows the
  traceback instead.
To add a task: one entry in TASKS (and a `conf/` file and a `scripts/TASK.py` calling
`hydra_main`)."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys

from nemo_avllm.errors import UserError

# task -> (function "module:attr" called with the composed config, default config name)
TASKS = {
    "train": ("nemo_avllm.training.train:main", "stage1_pretrain"),
    "prepare": ("nemo_avllm.data.prepare_cli:run", "prepare"),
    "features": ("nemo_avllm.training.feature_cache:run", "features"),
    "demo": ("nemo_avllm.demo.pipeline:main", "demo"),
    "import-hf": ("nemo_avllm.hf.import_hf:run", "import_hf"),
    "export-hf": ("nemo_avllm.hf.export_hf:run", "export_hf"),
    "launch": ("nemo_avllm.launch.submit:main", "launch"),
    "curate": ("nemo_avllm.curation.pipeline:run", "curate"),
    "generate": ("nemo_avllm.inference.tasks:generate", "generate"),
    "chat": ("nemo_avllm.inference.tasks:chat", "generate"),
    "evaluate": ("nemo_avllm.evaluation.evaluate:main", "evaluate"),
}

USAGE = f"""usage: avllm TASK [--config-name NAME] [key=value ...]
       avllm TASK --help          the task's keys, their values and what they mean

tasks: {", ".join(TASKS)}

Hydra options work as in scripts/TASK.py: --cfg job|hydra|all, -m/--multirun, --info.
--debug (or HYDRA_FULL_ERROR=1) shows the traceback of an error.

examples:
  avllm demo
  avllm prepare input=data/train.jsonl out_dir=data/prepared
  avllm train --config-name stage2_finetune model.restore_from=<stage-1 checkpoint folder>
"""

# Hydra's override grammar gives these characters a meaning; a value holding one is left alone
_GRAMMAR = re.compile(r"[\s'\"\\()\[\]{},$]")
# what NeMo's hydra_runner appends to every command line
_NEMO_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]
# tasks whose stdout is their answer: their logs go to stderr (conf/hydra/job_logging/stderr.yaml)
ANSWER_ON_STDOUT = {"generate", "chat"}


# Tasks whose config nests whole stage configs (stage1/stage2): they compose and check each stage
# they run themselves, as the stage's own job will (a two-stage config is not one valid config).
VALIDATES_ITS_STAGES = {"launch"}


def quote_override(arg: str) -> str:
    """`key=a/run--step=60-last` -> `key='a/run--step=60-last'`. Hydra refuses an unquoted '='
    in a value; a plain value (no quotes, brackets, commas, `$`) holding one is quoted for it."""
    key, sep, value = arg.partition("=")
    if arg.startswith("-") or not sep or "=" not in value or _GRAMMAR.search(arg):
        return arg
    return f"{key}='{value}'"


def run_task(task: str, cfg):
    module, attr = TASKS[task][0].split(":")
    return getattr(importlib.import_module(module), attr)(cfg)


def run(task: str, argv: list[str], prog: str) -> int:
    """Run one task as a Hydra app; returns the exit code (2: the user's mistake, one line)."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    from nemo_avllm import config

    debug = "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [quote_override(a) for a in argv if a != "--debug"]
    parser = get_args_parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    name = args.config_name or TASKS[task][1]
    overrides = list(args.overrides)
    results, failed = [], []

    def task_function(cfg) -> None:  # once per job (several with --multirun)
        try:
            if task not in VALIDATES_ITS_STAGES:
                config.check_values(cfg, config_name=name)
                config.check_required(cfg)
            results.append(run_task(task, cfg))
        except Exception as e:
            if debug:
                raise
            failed.append(e)
            raise _JobFailed from e  # not an Exception: passes Hydra's job handling, ends a sweep too

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises, so that the handler below sees the error
    try:
        if args.help:
            print(task_help(task, prog, name, overrides))
            return 0
        logs = "hydra/job_logging=stderr" if task in ANSWER_ON_STDOUT else "hydra/job_logging=stdout"
        args.overrides = overrides + [o if not o.startswith("hydra/job_logging=") else logs for o in _NEMO_OVERRIDES]
        version.setbase("1.3")  # jobs run in the current folder (no chdir), as single runs do
        _run_hydra(args=args, args_parser=parser, task_function=task_function, config_path=str(config.conf_dir()),
                   config_name=TASKS[task][1])
    except (Exception, _JobFailed) as e:
        failed.append(e)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    if failed:
        error = failed[0]
        line = None if debug else user_error(error, prog, name, overrides)
        if line is None:
            raise error
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    codes = [r for r in results if isinstance(r, int) and not isinstance(r, bool)]
    return max(codes, default=0)


class _JobFailed(BaseException):
    """Carries a job's error out of Hydra without Hydra printing it."""


def user_error(e: Exception, prog: str, name: str, overrides: list[str]) -> str | None:
    """One line for a user's mistake (key or file, what is wrong, what to do); None for a bug."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(e, UserError):
        return _one_line(str(e))
    if isinstance(e, OverrideParseException):
        reason = str(e.message).splitlines()[0]
        return (f"cannot read the override {e.override!r} ({reason}): quote a value with special characters, "
                f"e.g. 'key=\"a value, with commas\"' (README: Overrides)")
    if isinstance(e, MissingConfigException):
        return _missing_config(e)
    if isinstance(e, ConfigCompositionException):
        return _composition(e, prog, name, overrides)
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key} is required (??? in conf/): add {e.full_key}=..."
    if isinstance(e, InterpolationResolutionError):
        return f"{e.full_key}: {_one_line(str(e).splitlines()[0])}; fix the ${{...}} reference"
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)):
        return _one_line(str(e))
    return None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _missing_config(e) -> str:
    from nemo_avllm.config import conf_dir

    group, _, option = str(e.missing_cfg_file).rpartition("/")
    if group:
        options = list(e.options or [])
        what = f"{group}={option}: conf/{group}/{option}.yaml does not exist; choose one of {', '.join(options)}"
    else:
        options = sorted(p.stem for p in conf_dir().glob("*.yaml"))
        what = f"--config-name {option}: conf/{option}.yaml does not exist; choose one of {', '.join(options)}"
    close = difflib.get_close_matches(option, options, n=1)
    return what + (f" (did you mean {close[0]}?)" if close else "")


def _composition(e, prog: str, name: str, overrides: list[str]) -> str:
    msg = str(e)
    unknown = re.search(r"Could not override '([^']+)'", msg)
    if unknown:
        key = unknown.group(1)
        append = re.search(r"use (\+\S+)", msg)
        close = difflib.get_close_matches(key, _known_keys(name, overrides, key), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        return (f"{key} is not a key of {name}; {hint}`{prog} --help` lists the keys "
                f"(a new key needs a '+': {append.group(1) if append else '+' + key + '=...'})")
    exists = re.search(r"An item is already at '([^']+)'", msg)
    if exists:
        return f"+{exists.group(1)}: the key already exists; set it without the '+': {exists.group(1)}=..."
    return _one_line(msg)


def _known_keys(name: str, overrides: list[str], bad_key: str) -> list[str]:
    """Every key of the config (composed with the other overrides when they compose)."""
    from nemo_avllm import config

    rest = [o for o in overrides if not o.lstrip("+~").startswith(bad_key + "=")]
    for attempt in (rest, []):
        try:
            return [k for k, _ in config.flat_keys(config.load(name, attempt))]
        except Exception:  # another bad override: fall back to the plain config
            continue
    return []


def task_help(task: str, prog: str, name: str, overrides: list[str]) -> str:
    from nemo_avllm import config

    return (f"usage: {prog} [--config-name NAME] [key=value ...] [--cfg job|hydra|all] [-m] [--debug]\n\n"
            f"{config.describe(name, overrides)}\n\n"
            "Hydra: --cfg job prints the composed config, -m/--multirun sweeps a=1,2, --hydra-help shows "
            "Hydra's own options. A value with '=' (a checkpoint folder) can be given as is or quoted: "
            "\"key='a=b'\". --debug (or HYDRA_FULL_ERROR=1) shows the traceback of an error.")


def hydra_main(task: str):
    """The `scripts/TASK.py` entry point: the same app as `avllm TASK`."""

    def main() -> None:
        sys.exit(run(task, sys.argv[1:], prog=os.path.basename(sys.argv[0])))

    return main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        close = difflib.get_close_matches(task, list(TASKS), n=1)
        print(f"avllm: error: unknown task {task!r}{f' (did you mean {close[0]}?)' if close else ''}; "
              f"tasks: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    return run(task, rest, prog=f"avllm {task}")


if __name__ == "__main__":
    sys.exit(main())
