"""The steps the demo and its ablations share: the out_dir check, the data (clips, tokenizer,
`prepare`), the demo's random encoders saved as files, and each stage's training config."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_avllm.errors import UserError


def check_out_dir(out: Path, cfg: DictConfig) -> None:
    """One out_dir holds one demo: its data, features and runs are reused when the demo runs
    again with the same settings, and refused when the settings that shape them differ."""
    stamp = {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in
             ("seed", "model", "num_train", "num_eval", "train_manifest", "stage2_manifest", "eval_manifest",
              "tokenizer_vocab")}
    path = out / "demo_settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in stamp.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"out_dir={out} holds a demo made with other settings "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                             f"choose another out_dir or delete {out}")
    path.write_text(json.dumps(stamp, indent=1))


def stage_cfg(cfg: DictConfig, stage: int, out: Path, paths: dict, restore: str | None) -> DictConfig:
    from nemo_avllm import config

    s = cfg[f"stage{stage}"]
    name = "stage1_pretrain" if stage == 1 else "stage2_finetune"
    overrides = [
        f"model={cfg.model}",
        f"name=demo_stage{stage}",
        f"model.tokenizer='{out / 'tokenizer'}'",
        f"model.data.train_manifest='{paths[f'stage{stage}']}'",
        f"model.data.index='{out / 'prepared'}'",
        f"model.data.feature_cache='{out / 'features'}'",
        f"model.data.num_workers={cfg.loader_workers}",
        f"model.vision.checkpoint='{out / 'encoders' / 'vision.safetensors'}'",
        f"model.audio.checkpoint='{out / 'encoders' / 'audio.safetensors'}'",
        f"model.restore_from='{restore}'" if restore else "model.restore_from=null",
        f"model.allow_random_init={str(cfg.allow_random_init).lower()}",
        f"exp_manager.exp_dir='{out / 'runs'}'",
        "exp_manager.create_tensorboard_logger=true",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=1000000",
        "trainer.devices=1",
        f"trainer.seed={cfg.seed}",
        *encoder_seed_overrides(cfg),
        "trainer.log_every_n_steps=10",
        f"trainer.enable_progress_bar={str(cfg.progress_bar).lower()}",
        *dotted(OmegaConf.to_container(s, resolve=True)),
    ]
    return config.load(name, overrides)


def encoder_seed_overrides(cfg: DictConfig, prefix: str = "model.") -> list[str]:
    """The demo's encoders are random (no downloads): their initial weights follow the demo seed."""
    return [f"{prefix}vision.init_seed={cfg.seed}", f"{prefix}audio.init_seed={cfg.seed}"]


def dotted(d: dict, prefix: str = "") -> list[str]:
    """{"model": {"optim": {"lr": 1}}} -> ["model.optim.lr=1"] (Hydra overrides)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return out


def last_checkpoint(run_dir: Path) -> Path:
    last = sorted((run_dir / "checkpoints").glob("*-last"))
    if not last:
        raise FileNotFoundError(f"no last checkpoint in {run_dir / 'checkpoints'}")
    return last[-1]


def validate_stages(cfg: DictConfig, out: Path) -> None:
    """Refuse bad stage settings before minutes of data generation (paths are checked later)."""
    from nemo_avllm.training.train import validate

    for stage in (1, 2):
        try:
            validate(stage_cfg(cfg, stage, out, {"stage1": out, "stage2": out}, str(out) if stage == 2 else None),
                     paths=False)
        except UserError as e:
            raise UserError(f"stage{stage}.{e}") from e


def prepare_data(cfg: DictConfig, out: Path) -> dict:
    """The manifests (given, or the synthetic set generated into out/data), the tokenizer trained
    on their text (out/tokenizer) and `prepare` of every clip (out/prepared). Returns the manifest
    paths {"stage1", "stage2", "eval"}."""
    from nemo_avllm.data.prepare import prepare
    from nemo_avllm.data.tokenizer import train_sentencepiece
    from nemo_avllm.demo import clips

    if cfg.get("train_manifest"):
        paths = {"stage1": Path(cfg.train_manifest), "stage2": Path(cfg.get("stage2_manifest") or cfg.train_manifest),
                 "eval": Path(cfg.eval_manifest)}
    else:
        print(f"[demo] generating {cfg.num_train} training and {cfg.num_eval} held-out clips with ffmpeg")
        paths = clips.generate(out / "data", cfg.num_train, cfg.num_eval, seed=cfg.seed, workers=cfg.num_workers or 2)
    print("[demo] training the tokenizer")
    train_sentencepiece(clips.corpus(paths), out / "tokenizer", vocab_size=int(cfg.tokenizer_vocab))
    print("[demo] prepare: probing clips, writing FLAC side-cars")
    sources = [str(paths["stage1"]), str(paths["stage2"]), str(paths["eval"])]
    print(prepare(sources, out / "prepared", num_workers=max(1, cfg.num_workers or 2), progress=cfg.progress_bar))
    return paths


def save_demo_encoders(model_cfg, folder: Path, seed: int):
    """The demo's encoders are random (no downloads): build them from `seed` and save them in the
    open_clip / laion_clap (or HF Whisper) layouts, so features, training and `avllm generate` on raw clips all
    use the same weights (the configs point at the files)."""
    import torch
    from safetensors.torch import save_file

    from nemo_avllm.training.feature_cache import build_encoders

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vision, audio = build_encoders(model_cfg)
    files = {"vision": folder / "vision.safetensors", "audio": folder / "audio.safetensors"}
    save_file({f"visual.{k}": v.contiguous() for k, v in vision.visual.state_dict().items()}, str(files["vision"]))
    save_file({k: v.contiguous() for k, v in audio.public_state_dict().items()}, str(files["audio"]))
    model_cfg.vision.checkpoint, model_cfg.audio.checkpoint = str(files["vision"]), str(files["audio"])
    return model_cfg
