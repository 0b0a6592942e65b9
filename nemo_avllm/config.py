"""Where configs live and how they are composed (Hydra), for entry points and tests alike.

`conf/` is the single source of hyper-parameters; code reads values from the composed config and
never hard-codes them. `load(config_name, overrides)` gives what the `avllm` / `scripts/*.py`
Hydra app gives a task, without an app (tests, the demo's stages). `check_values` is the one table
of per-key checks (type, range, input paths) run before any task starts; `describe` is a task's
`--help` (keys, values and their comments in conf/)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_avllm.errors import UserError


def conf_dir() -> Path:
    """`conf/` of this checkout, or $AVLLM_CONF_DIR."""
    env = os.environ.get("AVLLM_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not path.is_dir():
        raise FileNotFoundError(f"config folder {path} not found; set AVLLM_CONF_DIR to the project's conf/")
    return path


def _compose(config_dir: Path, name: str, overrides) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def load(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line style overrides (`a.b=c`)."""
    return _compose(conf_dir(), config_name, overrides)


def load_model(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Just a `conf/model/<name>.yaml` config (what `cfg.model` holds in a full config)."""
    return _compose(conf_dir() / "model", name, overrides)


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


# --------------------------------------------------------------------------------------------
# Checking values: one table for the keys every task shares, checked before any work starts
# --------------------------------------------------------------------------------------------


def _whole(lo: int, also: tuple = (), nullable: bool = False):
    """A whole number >= lo (or one of `also`, or null when `nullable`)."""
    return lambda v: (v is None and nullable) or v in also or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)


def _number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def _betas(v) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(_number(0, 1, hi_open=True)(b) for b in v)


# key -> (what a valid value is, test, an example). Keys absent from a task's config are skipped;
# "CONFIG:key" applies to that config only (a task's own top-level keys).
VALUE_RULES: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "model.micro_batch_size": ("a whole number >= 1", _whole(1), "8"),
    "model.global_batch_size": ("a whole number >= 1 (a multiple of micro batch x data-parallel size)", _whole(1), "256"),
    "model.tensor_model_parallel_size": ("a whole number >= 1", _whole(1), "2"),
    "model.pipeline_model_parallel_size": ("a whole number >= 1", _whole(1), "2"),
    "model.seq_length": ("a whole number >= 1", _whole(1), "2048"),
    "model.num_frames": ("a whole number >= 1", _whole(1), "32"),
    "model.num_audio_segments": ("a whole number >= 1", _whole(1), "4"),
    "model.encoder_dtype": ("auto (bf16 with a GPU, fp32 on CPU), fp32, bf16 or fp16",
                            lambda v: v in ("auto", "fp32", "bf16", "fp16"), "bf16"),
    "model.nan_policy": ("skip or stop", lambda v: v in ("skip", "stop"), "skip"),
    "model.optim.lr": ("a number > 0", _number(0, lo_open=True), "2e-5"),
    "model.optim.min_lr": ("a number >= 0", _number(0), "0.0"),
    "model.optim.weight_decay": ("a number >= 0", _number(0), "0.0"),
    "model.optim.warmup_ratio": ("a number in [0, 1)", _number(0, 1, hi_open=True), "0.03"),
    "model.optim.clip_grad": ("a number >= 0 (0: no clipping)", _number(0), "1.0"),
    "model.optim.eps": ("a number > 0", _number(0, lo_open=True), "1e-8"),
    "model.optim.betas": ("two numbers in [0, 1)", _betas, "[0.9,0.98]"),
    "model.data.num_workers": ("a whole number >= 0", _whole(0), "4"),
    "model.data.modality_schedule": ("mat, pt1 or pt2", lambda v: v in ("mat", "pt1", "pt2"), "pt1"),
    "model.data.modality_schedule_split": ("a number in [0, 1]", _number(0, 1), "0.3"),
    "model.data.packing": ("true or false", lambda v: isinstance(v, bool), "true"),
    "trainer.devices": ("a whole number >= 1, -1 (all), auto or a list of device ids",
                        lambda v: isinstance(v, ListConfig) or _whole(1, also=(-1, "auto"))(v), "8"),
    "trainer.num_nodes": ("a whole number >= 1", _whole(1), "4"),
    "trainer.max_steps": ("a whole number >= 1, or -1 (max_epochs decides)", _whole(1, also=(-1,)), "1000"),
    "trainer.max_epochs": ("a whole number >= 1", _whole(1), "3"),
    "trainer.log_every_n_steps": ("a whole number >= 1", _whole(1), "10"),
    "trainer.seed": ("a whole number >= 0", _whole(0), "1234"),
    "trainer.gpu_memory_gib": ("a number > 0, or null (the GPU's own memory)",
                               lambda v: v is None or _number(0, lo_open=True)(v), "80"),
    "exp_manager.checkpoint_callback_params.save_top_k": ("a whole number >= -1 (-1: keep all)", _whole(-1), "2"),
    "exp_manager.checkpoint_callback_params.every_n_train_steps": ("a whole number >= 0 or null", _whole(0, nullable=True), "200"),
    "features:batch_size": ("a whole number >= 1", _whole(1), "8"),
    "features:clips_per_shard": ("a whole number >= 1", _whole(1), "256"),
    "prepare:num_workers": ("a whole number >= 1, or null (all cores)", _whole(1, nullable=True), "4"),
    "demo:num_workers": ("a whole number >= 0, or null", _whole(0, nullable=True), "2"),
    "demo:num_train": ("a whole number >= 1", _whole(1), "800"),
    "demo:num_eval": ("a whole number >= 1", _whole(1), "60"),
}

# key (or "CONFIG:key") -> (kind, what it should be). Inputs that must exist; null means "not used".
# kinds: file, dir, any (file or folder), checkpoint (a dist checkpoint folder with metadata.json)
PATH_RULES: dict[str, tuple[str, str]] = {
    "model.tokenizer": ("dir", "the LLM's Hugging Face tokenizer folder (tokenizer.model + tokenizer_config.json)"),
    "model.restore_from": ("checkpoint", "a dist checkpoint folder, e.g. <exp_dir>/<name>/checkpoints/<name>--step_100-last"),
    "model.data.train_manifest": ("file", "a JSON Lines manifest (docs/data.md)"),
    "model.data.index": ("any", "the folder `avllm prepare` wrote (or its index.jsonl)"),
    "model.data.feature_cache": ("dir", "the folder `avllm features` wrote"),
    "model.vision.checkpoint": ("any", "open_clip / HF CLIP weights (file or folder)"),
    "model.audio.checkpoint": ("any", "laion_clap / HF CLAP weights (file or folder)"),
    "prepare:input": ("file", "a JSON Lines manifest or a text file of video paths"),
    "features:source": ("any", "a manifest or the folder `avllm prepare` wrote"),
    "features:index": ("any", "the folder `avllm prepare` wrote"),
    "import_hf:hf_dir": ("dir", "a Hugging Face LLaMA/Vicuna folder (config.json, weights, tokenizer)"),
    "export_hf:checkpoint": ("checkpoint", "a dist checkpoint folder, e.g. <exp_dir>/<name>/checkpoints/<name>--step_100-last"),
    "export_hf:tokenizer": ("dir", "a Hugging Face tokenizer folder"),
    "export_hf:vision_checkpoint": ("any", "open_clip / HF CLIP weights (file or folder)"),
    "export_hf:audio_checkpoint": ("any", "laion_clap / HF CLAP weights (file or folder)"),
    "demo:train_manifest": ("file", "a JSON Lines manifest"),
    "demo:stage2_manifest": ("file", "a JSON Lines manifest"),
    "demo:eval_manifest": ("file", "a JSON Lines manifest"),
}

_ABSENT = object()


def _value(cfg: DictConfig, key: str):
    """The value at `key`, or _ABSENT when the config has no such key (or it is still ???)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_missing(node, leaf):
        return _ABSENT
    return node[leaf]


def _shown(v) -> str:
    return repr(v) if isinstance(v, str) else str(OmegaConf.to_container(v) if isinstance(v, ListConfig) else v)


def _path_problem(kind: str, path: Path) -> str | None:
    if not path.exists():
        return "no such file or folder"
    if kind == "file" and not path.is_file():
        return "is a folder, not a file"
    if kind in ("dir", "checkpoint") and not path.is_dir():
        return "is a file, not a folder"
    if kind == "checkpoint" and not (path / "metadata.json").is_file():
        return "is not a dist checkpoint (no metadata.json)"
    return None


def _rules(table: dict, config_name: str | None):
    for key, rule in table.items():
        scope, _, k = key.rpartition(":")
        if not scope or scope == config_name:
            yield k, rule


def check_values(cfg: DictConfig, paths: bool = True, config_name: str | None = None) -> None:
    """Type and range of every `VALUE_RULES` key, and existence of every `PATH_RULES` input the
    config sets (with `config_name`, also that config's own keys). Raises a `UserError` naming
    the key, what is wrong and what to give instead. Cross-key training checks (divisibility,
    ...) live in `nemo_avllm.training.train.validate`."""
    for key, (need, ok, example) in _rules(VALUE_RULES, config_name):
        v = _value(cfg, key)
        if v is not _ABSENT and not ok(v):
            raise UserError(f"{key}={_shown(v)} is not valid: give {need}, e.g. {key}={example}")
    if not paths:
        return
    for key, (kind, what) in _rules(PATH_RULES, config_name):
        v = _value(cfg, key)
        if v is _ABSENT or v is None or v == "":
            continue
        for p in ([v] if isinstance(v, str) else list(v) if isinstance(v, ListConfig) else [str(v)]):
            problem = _path_problem(kind, Path(str(p)))
            if problem:
                raise UserError(f"{key}={p}: {problem}; give {what}")


def check_required(cfg: DictConfig) -> None:
    """Every ??? of the config must have been set on the command line."""
    # walk the nodes without resolving interpolations: a stage config nested in another (launch)
    # holds `${name}`-style references that only resolve in the stage's own config
    missing = sorted(k for k, v in flat_keys(cfg) if v == "???")
    if missing:
        keys = " ".join(f"{k}=..." for k in missing)
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (??? in conf/): add {keys}")


# --------------------------------------------------------------------------------------------
# Describing a config: its keys, values and the comments next to them in conf/ (`--help`)
# --------------------------------------------------------------------------------------------

_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w.-]*)\s*:(.*)$")


def flat_keys(cfg: DictConfig, prefix: str = ""):
    """(dotted key, value) of every key, depth first: a mapping yields itself, then its keys; a
    list or an empty mapping is a leaf. Interpolations stay unresolved (`${name}`), `???` stays."""
    for k in cfg:
        node = cfg._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none() and len(node):
            yield full, node
            yield from flat_keys(node, full + ".")
        else:
            yield full, node._value() if not isinstance(node, (DictConfig, ListConfig)) else node


def _split_comment(text: str) -> tuple[str, str, int]:
    """A YAML line's rest after `key:` -> (value, comment after an unquoted '#', its column)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i], text[i + 1 :].strip(), i
    return text, "", -1


def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """The header comment of a conf/ YAML file and key -> comment: a key's inline comment (with
    the comment lines aligned under it) or the comment lines right above it."""
    header: list[str] = []
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: list[str] = []
    seen_key, last, inline_col = False, None, -1
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            pending, last = [], None
            continue
        if stripped.startswith("#"):
            text, col = stripped.lstrip("#").strip(), line.index("#")
            if not seen_key:
                header.append(text)
            elif last is not None and 0 <= inline_col - 2 <= col:
                comments[last] += " " + text  # continues the inline comment above
            else:
                pending.append(text)
            continue
        m = _KEY_LINE.match(line)
        if not m or stripped.startswith("-"):
            continue
        seen_key = True
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([k for _, k in stack] + [key])
        value, inline, col = _split_comment(m.group(3))
        comments[full] = " ".join(pending + ([inline] if inline else []))
        pending, last = [], full
        inline_col = len(line) - len(m.group(3)) + col if inline else -1
        if not value.strip():
            stack.append((indent, key))
    return " ".join(header), {k: v for k, v in comments.items() if v}


def _override_text(v) -> str:
    """A value as it is written on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, DictConfig):
        return "{" + ", ".join(f"{k}: {_override_text(v._get_node(k)._value())}" for k in v) + "}"
    if isinstance(v, ListConfig):
        return "[" + ",".join(_override_text(x) for x in v) + "]"
    return str(v)


def describe(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """`--help` of a task: the config's header comment, its group choices, then every key with
    its value and the comment next to it in conf/ (the file merged last wins)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    cfg = load(config_name, overrides)
    root = conf_dir()
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        defaults = GlobalHydra.instance().config_loader().compute_defaults_list(config_name, list(overrides), RunMode.RUN)
    header, comments = "", {}
    for d in defaults.defaults:
        if d.config_path is None or d.config_path.startswith("hydra/"):
            continue
        head, found = yaml_comments(root / f"{d.config_path}.yaml")
        prefix = f"{d.package}." if d.package else ""
        comments.update({prefix + k: v for k, v in found.items()})
        if d.primary:
            header = head
    choices = {k: v for k, v in defaults.overrides.known_choices.items() if v and not k.startswith("hydra/")}
    lines = [header, ""] if header else []
    lines.append(f"conf/{config_name}.yaml" + (", with " + " ".join(f"{k}={v}" for k, v in choices.items())
                                               + " (a group choice picks a conf/<group>/ file)" if choices else ""))
    lines.append("keys (key=value as now, ??? = required):")
    rows, folded = [], ()
    for k, v in flat_keys(cfg):
        if k.startswith(folded):
            continue
        if isinstance(v, DictConfig) and len(v):
            # a mapping with a comment and none on its keys (a flow mapping): one row
            flat = not any(isinstance(v._get_node(c), (DictConfig, ListConfig)) for c in v)
            if flat and comments.get(k) and not any(c.startswith(k + ".") for c in comments):
                rows.append((f"{k}={_override_text(v)}", comments[k]))
                folded = k + "."
            elif comments.get(k):
                rows.append((f"{k}.*", comments[k]))
            continue
        rows.append((f"{k}={_override_text(v)}", comments.get(k, "")))
    width = min(44, max(len(r[0]) for r in rows))
    lines += [f"  {kv:<{width}}  {c}".rstrip() for kv, c in rows]
    return "\n".join(lines)
