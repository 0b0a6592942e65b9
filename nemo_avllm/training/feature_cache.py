"""`avllm features`: a model config's frozen encoders and decode settings, handed to the data code.

`data/feature_build.py` writes a feature cache from the fields, decode settings and encoders it
is given; this module makes them from the model config (the data code never reads it), and is
the task's entry point."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from nemo_avllm.config import to_dict
from nemo_avllm.data.feature_build import FeatureReport, write_feature_cache
from nemo_avllm.data.features import FeatureCache, verify_cache
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training.data import cache_fields, decode_settings


def model_fields(model_cfg) -> dict:
    """What cached tokens must be made for to serve this model config (`training.data.cache_fields`)."""
    return cache_fields(avllm_config(model_cfg))


def open_cache(path, model_cfg) -> FeatureCache:
    """The cache at `path`, refused when it was built for another model config."""
    return FeatureCache(path, model_fields(model_cfg))


def build_encoders(model_cfg, device: str | torch.device = "cpu"):
    """The frozen vision and audio encoders of a model config, in `model.encoder_dtype`, eval mode.
    Null encoder checkpoints are refused unless `model.allow_random_init=true`."""
    from nemo_avllm.model.encoders import VisionEncoder, build_audio_encoder
    from nemo_avllm.model.provider import check_encoder_weights

    check_encoder_weights({**to_dict(model_cfg), "build_encoders": True})
    cfg = avllm_config(model_cfg)
    return (VisionEncoder(cfg.vision).to(device).set_dtype(cfg.encoder_dtype),
            build_audio_encoder(cfg.audio).to(device).set_dtype(cfg.encoder_dtype))


def build_feature_cache(source, out_dir, model_cfg, *, backend: str = "auto", encoders: tuple | None = None,
                        **kw) -> FeatureReport:
    """`data.feature_build.write_feature_cache` for a model config: its cache fields, its decode
    settings with `backend` (one back-end for the cache), and its encoders unless `encoders`
    (vision, audio) are given (e.g. a model's own). `kw`: index, dtype, clips_per_shard,
    batch_size, device, resume, progress."""
    model = avllm_config(model_cfg)
    make = encoders if encoders is not None else partial(build_encoders, model_cfg)
    return write_feature_cache(source, out_dir, cache_fields(model), decode_settings(model, backend), make, **kw)


def run(cfg) -> int:
    """`avllm features` / `scripts/features.py` with a composed `conf/features.yaml`.
    `verify=true`: only check the cache at out_dir (exit 1 when a shard is damaged);
    `repair=true`: set damaged shards aside (`*.damaged`) and re-encode their clips."""
    if cfg.get("verify") or cfg.get("repair"):
        damaged = verify_cache(cfg.out_dir)
        for shard, why in sorted(damaged.items()):
            print(f"damaged: {Path(cfg.out_dir) / shard}: {why}")
        if not cfg.get("repair"):
            print(f"feature cache {cfg.out_dir}: {len(damaged)} damaged shards"
                  + ("; rerun with repair=true source=<the manifests> to re-encode their clips" if damaged else ""))
            return 1 if damaged else 0
        for shard in damaged:
            os.replace(Path(cfg.out_dir) / shard, Path(cfg.out_dir) / f"{shard}.damaged")  # resume re-encodes them
    source = list(cfg.source) if not isinstance(cfg.source, str) else cfg.source
    report = build_feature_cache(
        source, cfg.out_dir, cfg.model, index=cfg.get("index"), dtype=cfg.dtype, clips_per_shard=int(cfg.clips_per_shard),
        batch_size=int(cfg.batch_size), backend=cfg.backend, resume=bool(cfg.resume),
    )
    print(report)
    return 0
