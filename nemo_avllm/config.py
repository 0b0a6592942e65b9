"""Where configs live and how they are composed (Hydra), for entry points and tests alike.

`conf/` is the single source of hyper-parameters; code reads values from the composed config and
never hard-codes them. `load(config_name, overrides)` gives what `scripts/*.py` get from
`hydra_runner`, without a Hydra app (tests, the `avllm` CLI)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


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
