"""A composed stage config back to the Hydra overrides that produce it (what a job's command line
carries), so `avllm launch stage1.model.x=...` reaches the remote `avllm train` unchanged.

Values are compared unresolved: `${name}`-style interpolations stay interpolations."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

_SAFE = re.compile(r"^[A-Za-z0-9_./:@%+-]+$")
_LOOKS_TYPED = re.compile(r"^([-+]?[0-9._]+([eE][-+]?[0-9]+)?|true|false|null|none|nan|[-+]?inf)$", re.I)


def format_value(v) -> str:
    """A Python value as Hydra override syntax (strings quoted when Hydra would re-type them)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _SAFE.match(s) and not _LOOKS_TYPED.match(s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _leaves(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def diff_overrides(cfg: DictConfig, base: DictConfig) -> list[str]:
    """Hydra overrides turning `base` into `cfg`: `k=v` for changed keys, `+k=v` for new ones,
    `~k` for removed ones."""
    new = _leaves(OmegaConf.to_container(cfg, resolve=False))
    old = _leaves(OmegaConf.to_container(base, resolve=False))
    out = [f"{k}={format_value(v)}" for k, v in new.items() if k in old and old[k] != v]
    out += [f"+{k}={format_value(v)}" for k, v in new.items() if k not in old]
    out += [f"~{k}" for k in old if k not in new and not any(n.startswith(k + ".") for n in new)]
    return out
