"""`avllm demo ablation=NAME`: the paper's ablations (§4.4) in miniature, on the demo's data.

One synthetic data set (or your manifests), one tokenizer and one `prepare`; then, per setting,
the frozen encoders' feature cache, stage 1, stage 2 and the held-out evaluation, all with the
demo's own steps (`nemo_avllm.demo.steps`, `nemo_avllm.demo.scoring`) and the same step budget (`stage1.trainer.max_steps`,
`stage2.trainer.max_steps`: lower them for a quick run). Every setting is scored on the same
held-out questions; one table per ablation is printed and written to `<out_dir>/results.md`
(raw numbers in `results.json`, each setting's runs under `<out_dir>/<ablation>/<setting>/`).

| ablation | paper | settings (conf/demo.yaml `ablations`) |
|---|---|---|
| training_strategy | Table 5 | `model.data.modality_schedule` = mat, pt1, pt2 (phase split `modality_schedule_split`) |
| modality | Fig. 5 | one model, asked with `<VIS>`, `<AUD>`, `<AUD_VIS>` (the demo's per-token table) |
| audio_encoder | Table 7 | model configs: tiny HTSAT (`tiny_demo`) vs tiny Whisper (`tiny_demo_whisper`) |
| frames | Fig. 6 | `model.num_frames` T |
| segments | Fig. 7 | `model.num_audio_segments` K |
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_avllm.demo import scoring, steps
from nemo_avllm.errors import UserError

ABLATIONS = ("training_strategy", "modality", "audio_encoder", "frames", "segments")
SCHEDULE_KEY = "modality_schedule"


def settings(cfg: DictConfig) -> list[tuple[str, str, dict, dict]]:
    """(label, model config name, model overrides, stage-only overrides) of each setting. Model
    overrides shape the features and both stages; stage-only ones (`model.data.*`) go to the
    stages that have the key."""
    name, values = str(cfg.ablation), cfg.ablations
    if name not in ABLATIONS:
        raise UserError(f"ablation={name!r}; expected one of {', '.join(ABLATIONS)} (or null for the plain demo)")
    model = str(cfg.model)
    if name == "modality":
        return [("baseline", model, {}, {})]
    if name == "audio_encoder":
        return [(str(m), str(m), {}, {}) for m in values.audio_encoder]
    if name == "frames":
        return [(f"T={t}", model, {"num_frames": int(t)}, {}) for t in values.frames]
    if name == "segments":
        return [(f"K={k}", model, {"num_audio_segments": int(k)}, {}) for k in values.segments]
    split = float(values.modality_schedule_split)
    return [(str(s), model, {}, {"data": {SCHEDULE_KEY: str(s), f"{SCHEDULE_KEY}_split": split}})
            for s in values.training_strategy]


def _stages_with_schedule(cfg: DictConfig) -> list[int]:
    """The stages whose data config has `model.data.modality_schedule` (the training_strategy
    ablation sets it there and nowhere else)."""
    from nemo_avllm import config

    names = {1: "stage1_pretrain", 2: "stage2_finetune"}
    return [s for s, n in names.items()
            if OmegaConf.select(config.load(n, [f"model={cfg.model}"]), f"model.data.{SCHEDULE_KEY}") is not None]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", label.replace("=", "")) or "setting"


def _quoted(d):
    """Path values quoted for Hydra overrides (`steps.dotted` writes values as they are)."""
    return {k: _quoted(v) if isinstance(v, dict) else (f"'{v}'" if isinstance(v, Path) else v) for k, v in d.items()}


def setting_cfg(cfg: DictConfig, folder: Path, model: str, model_over: dict, stage_over: dict,
                stage_over_in: tuple[int, ...]) -> DictConfig:
    """The demo config of one setting: its model, its overrides in both stage sections, and its
    own encoder files (`steps.save_demo_encoders` into folder/encoders), feature cache and run
    folder under `folder` (data and tokenizer are shared)."""
    own = {"model": {**model_over, "vision": {"checkpoint": folder / "encoders" / "vision.safetensors"},
                     "audio": {"checkpoint": folder / "encoders" / "audio.safetensors"},
                     "data": {"feature_cache": folder / "features"}},
           "exp_manager": {"exp_dir": folder / "runs"}}
    scfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    scfg.model = model
    for stage in (1, 2):
        parts = [scfg[f"stage{stage}"], _quoted(own)] + ([{"model": stage_over}] if stage in stage_over_in else [])
        scfg[f"stage{stage}"] = OmegaConf.merge(*parts)
    return scfg


def run_setting(cfg: DictConfig, out: Path, paths: dict, label: str, scfg: DictConfig, model_over: dict) -> dict:
    """Features, stage 1, stage 2 and evaluation of one setting (`setting_cfg`), under
    out/<ablation>/<label>/."""
    from nemo_avllm import config
    from nemo_avllm.training.feature_cache import build_feature_cache
    from nemo_avllm.training.train import train

    t0 = time.time()
    d = out / str(cfg.ablation) / _slug(label)
    model_cfg = config.load_model(str(scfg.model), [f"allow_random_init={str(cfg.allow_random_init).lower()}",
                                                    *steps.encoder_seed_overrides(cfg, prefix=""),
                                                    *steps.dotted(model_over)])
    model_cfg = steps.save_demo_encoders(model_cfg, d / "encoders", cfg.seed)
    print(f"[ablation] {label}: features")
    print(build_feature_cache(out / "prepared", d / "features", model_cfg, index=out / "prepared", dtype="fp32",
                              progress=cfg.progress_bar))
    restore = None
    for stage in (1, 2):
        print(f"[ablation] {label}: stage {stage}")
        run_cfg = steps.stage_cfg(scfg, stage, out, paths, restore)
        _, _, log_dir = train(run_cfg)
        restore = str(steps.last_checkpoint(Path(log_dir)))
    eval_cfg = OmegaConf.merge(run_cfg.model, {"build_encoders": False})
    results = scoring.evaluate(eval_cfg, Path(restore), paths["eval"], out / "tokenizer", d / "features")
    results["seconds"] = time.time() - t0
    results["checkpoint"] = restore
    return results


def summary_table(ablation: str, rows: list[tuple[str, dict]]) -> str:
    """Markdown: one row per setting; accuracy per question family (mean over the tokens that can
    answer it: audio families asked with `<VIS>` alone are left out), per token, and overall."""
    from nemo_avllm.demo.clips import AUDIO_FAMILIES, FAMILIES

    def answerable(key: str) -> bool:
        fam, tok = key.split("|")
        return not (fam in AUDIO_FAMILIES and tok == "<VIS>")

    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    head = ["setting", *FAMILIES, *(f"`{t}`" for t in scoring.TOKENS), "all", "time"]
    lines = [f"### Ablation: {ablation}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, res in rows:
        acc = {k: v for k, v in res["accuracy"].items() if answerable(k)}
        fams = [pct(mean([v for k, v in acc.items() if k.startswith(f"{f}|")])) for f in FAMILIES]
        toks = [pct(mean([v for k, v in acc.items() if k.endswith(f"|{t}")])) for t in scoring.TOKENS]
        lines.append(f"| {label} | " + " | ".join([*fams, *toks, pct(mean(list(acc.values()))),
                                                    f"{res['seconds']:.0f} s"]) + " |")
    return "\n".join(lines)


def run_ablation(cfg: DictConfig) -> int:
    """`avllm demo ablation=NAME` (module docstring)."""
    t0 = time.time()
    plan = settings(cfg)
    schedule_stages = tuple(_stages_with_schedule(cfg)) if cfg.ablation == "training_strategy" else (1, 2)
    if cfg.ablation == "training_strategy" and not schedule_stages:
        raise UserError(f"ablation=training_strategy needs model.data.{SCHEDULE_KEY} in conf/data/*.yaml "
                        f"(the modality schedules mat/pt1/pt2); this checkout has none")
    out = Path(cfg.out_dir).resolve()
    setting_cfgs = []
    for label, model, model_over, stage_over in plan:
        scfg = setting_cfg(cfg, out / str(cfg.ablation) / _slug(label), model, model_over, stage_over, schedule_stages)
        steps.validate_stages(scfg, out)  # every setting's stage configs, before any data is made
        setting_cfgs.append(scfg)
    out.mkdir(parents=True, exist_ok=True)
    steps.check_out_dir(out, cfg)
    paths = steps.prepare_data(cfg, out)
    rows = [(label, run_setting(cfg, out, paths, label, scfg, model_over))
            for (label, _, model_over, _), scfg in zip(plan, setting_cfgs)]
    if cfg.ablation == "modality":
        md = f"### Ablation: modality\n\n{scoring.table(rows[0][1])}"
    else:
        md = summary_table(str(cfg.ablation), rows)
    budget = f"stage 1: {cfg.stage1.trainer.max_steps} steps, stage 2: {cfg.stage2.trainer.max_steps} steps"
    text = (f"{md}\n\n{cfg.num_train} training clips, {budget}, seed {cfg.seed}; "
            f"total {time.time() - t0:.0f} s\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {label: {k: v for k, v in res.items() if k != "rows"} for label, res in rows}, indent=1))
    print("\n" + text)
    return 0
