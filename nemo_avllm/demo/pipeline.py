"""`avllm demo`: the whole recipe in miniature, on CPU, from nothing.

1. a synthetic audio-visual dataset made with ffmpeg (`nemo_avllm.demo.clips`), or any
   manifest in the documented format via `train_manifest=`/`eval_manifest=`;
2. a small sentencepiece tokenizer trained on its text;
3. `prepare` (probe, FLAC side-cars, index) and `features` (frozen tiny CLIP/CLAP outputs cached);
4. stage 1 (projectors) then stage 2 (projectors + LLM) with the tiny model config, through the
   same entry point as cluster runs (`nemo_avllm.training.train.train`);
5. zero-shot evaluation on held-out clips: accuracy per question family and modality token,
   printed as a table and written to `<out_dir>/results.md` and `results.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)


def _stage_cfg(cfg: DictConfig, stage: int, out: Path, paths: dict, restore: str | None) -> DictConfig:
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
        *_encoder_seed_overrides(cfg),
        "trainer.log_every_n_steps=10",
        f"trainer.enable_progress_bar={str(cfg.progress_bar).lower()}",
        *_dotted(OmegaConf.to_container(s, resolve=True)),
    ]
    return config.load(name, overrides)


def _encoder_seed_overrides(cfg: DictConfig, prefix: str = "model.") -> list[str]:
    """The demo's encoders are random (no downloads): their initial weights follow the demo seed."""
    return [f"{prefix}vision.init_seed={cfg.seed}", f"{prefix}audio.init_seed={cfg.seed}"]


def _check_out_dir(out: Path, cfg: DictConfig) -> None:
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


def _dotted(d: dict, prefix: str = "") -> list[str]:
    """{"model": {"optim": {"lr": 1}}} -> ["model.optim.lr=1"] (Hydra overrides)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return out


def _last_checkpoint(run_dir: Path) -> Path:
    last = sorted((run_dir / "checkpoints").glob("*-last"))
    if not last:
        raise FileNotFoundError(f"no last checkpoint in {run_dir / 'checkpoints'}")
    return last[-1]


def evaluate(model_cfg, checkpoint_dir: Path, eval_manifest: Path, tokenizer_dir: Path, feature_cache: Path,
             batch_size: int = 32, max_new_tokens: int = 32) -> dict:
    """Greedy answers to held-out questions -> accuracy per (family, token)."""
    from nemo_avllm.data.collate import stack_rows
    from nemo_avllm.data.manifest import resolve_media_path, stable_id
    from nemo_avllm.data.tokenizer import load_tokenizer
    from nemo_avllm.inference.generate import greedy_generate, normalize_answer, prompt_ids
    from nemo_avllm.model.avllm import EncoderFeatures
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint
    from nemo_avllm.training.feature_cache import open_cache

    tok = load_tokenizer(tokenizer_dir)
    cache = open_cache(feature_cache, model_cfg)
    model = build_model(model_cfg)
    checkpoint.load(checkpoint_dir, model)
    items = [json.loads(line) for line in Path(eval_manifest).read_text().splitlines() if line.strip()]
    base = Path(eval_manifest).parent
    hits: dict[tuple[str, str], list[int]] = defaultdict(list)
    part_hits: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        feats = [cache.get(stable_id(resolve_media_path(it["video"], base), None)) for it in chunk]
        keep = [(it, f) for it, f in zip(chunk, feats) if f is not None]
        if not keep:
            continue
        prompts = [prompt_ids(it["conversations"], tok, model.layout) for it, _ in keep]
        stacked = {k: stack_rows([f.get(k) for _, f in keep]) for k in ("temporal", "spatial", "audio")}
        ef = EncoderFeatures(**{k: v.float() if v is not None else None for k, v in stacked.items()})
        answers = greedy_generate(model, prompts, features=ef, eos_id=tok.eos_token_id, max_new_tokens=max_new_tokens)
        for (it, _), ans in zip(keep, answers):
            text = tok.decode(ans, skip_special_tokens=True)
            words = normalize_answer(text).split()
            # one-word answers must match exactly; a reasoning answer is scored on its verdict
            verdict = words[-1] if it.get("reasoning") and words else " ".join(words)
            ok = int(verdict == normalize_answer(it["answer"]))
            hits[(it["family"], it["token"])].append(ok)
            # ... and each of its parts (observations, verdict) on its own
            parts = {name: int(_says(words, phrase)) for name, phrase in (it.get("parts") or {}).items()}
            for name, hit in parts.items():
                part_hits[(it["family"], name, it["token"])].append(hit)
            rows.append({"id": it["id"], "family": it["family"], "token": it["token"], "answer": it["answer"],
                         "generated": text, "correct": ok, **({"parts": parts} if parts else {})})
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"accuracy": {f"{fam}|{t}": mean(v) for (fam, t), v in hits.items()},
            "counts": {f"{fam}|{t}": len(v) for (fam, t), v in hits.items()},
            "parts": {f"{fam}|{part}|{t}": mean(v) for (fam, part, t), v in part_hits.items()},
            "rows": rows}


def _says(words: list[str], phrase: str) -> bool:
    """Whether the normalised answer contains the normalised phrase as whole words."""
    from nemo_avllm.inference.generate import normalize_answer

    return f" {normalize_answer(phrase)} " in f" {' '.join(words)} "


TOKENS = ("<VIS>", "<AUD>", "<AUD_VIS>")


def table(results: dict, cell=lambda acc, n: f"{100 * acc:.0f}% (n={n})") -> str:
    """Markdown table: accuracy per family x modality token; under a reasoning family, one row per
    part of its answer (each observation, the verdict). `cell(value, count)` writes a cell."""
    from nemo_avllm.demo.clips import CHANCE, FAMILIES

    lines = ["| question family | chance | " + " | ".join(f"`{t}`" for t in TOKENS) + " |",
             "|---|---|" + "---|" * len(TOKENS)]

    def row(label: str, chance: float, values: dict, prefix: str) -> str:
        cells = []
        for t in TOKENS:
            key = f"{prefix}|{t}"
            n = results["counts"].get(f"{prefix.split('|')[0]}|{t}")
            cells.append(cell(values[key], n) if key in values else "–")
        return f"| {label} | {100 * chance:.0f}% | " + " | ".join(cells) + " |"

    for fam in FAMILIES:
        lines.append(row(fam, CHANCE[fam], results["accuracy"], fam))
        names = dict.fromkeys(k.split("|")[1] for k in results.get("parts", {}) if k.startswith(f"{fam}|"))
        for name in names:
            lines.append(row(f"↳ {fam}: {name}", CHANCE.get(name, 0.5), results["parts"], f"{fam}|{name}"))
    return "\n".join(lines)


def check_bars(results: dict, bars) -> list[str]:
    """What misses the demo's bars (conf/demo.yaml `bars`): every family with a token that can
    answer it at or above its bar; audio families asked with <VIS> only near chance."""
    from nemo_avllm.demo.clips import AUDIO_FAMILIES, CHANCE

    misses = []
    for key, acc in sorted(results["accuracy"].items()):
        fam, tok = key.split("|")
        if fam in AUDIO_FAMILIES and tok == "<VIS>":
            if abs(acc - CHANCE[fam]) > float(bars.vis_only_audio_band):
                misses.append(f"{key}: {100 * acc:.0f}%, should be chance {100 * CHANCE[fam]:.0f}% "
                              f"+-{100 * float(bars.vis_only_audio_band):.0f}")
            continue
        bar = float(bars.get(fam, bars.other))
        if acc < bar:
            misses.append(f"{key}: {100 * acc:.0f}% < {100 * bar:.0f}%")
    return misses


def main(cfg: DictConfig) -> int:
    from nemo_avllm import config
    from nemo_avllm.training.feature_cache import build_feature_cache
    from nemo_avllm.training.train import train

    if cfg.get("ablation"):
        from nemo_avllm.demo.ablation import run_ablation

        return run_ablation(cfg)
    t0 = time.time()
    out = Path(cfg.out_dir).resolve()
    validate_stages(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out, cfg)
    paths = prepare_data(cfg, out)
    model_cfg = config.load_model(cfg.model, [f"allow_random_init={str(cfg.allow_random_init).lower()}",
                                              *_encoder_seed_overrides(cfg, prefix="")])
    model_cfg = save_demo_encoders(model_cfg, out / "encoders", cfg.seed)
    print("[demo] features: running the frozen encoders once per clip")
    print(build_feature_cache(out / "prepared", out / "features", model_cfg, index=out / "prepared", dtype="fp32",
                              progress=cfg.progress_bar))
    t_data = time.time() - t0

    print("[demo] stage 1: projectors only (LLM and encoders frozen)")
    s1 = _stage_cfg(cfg, 1, out, paths, None)
    _, _, log1 = train(s1)
    ck1 = _last_checkpoint(Path(log1))
    print("[demo] stage 2: projectors + LLM, from", ck1)
    s2 = _stage_cfg(cfg, 2, out, paths, str(ck1))
    _, _, log2 = train(s2)
    ck2 = _last_checkpoint(Path(log2))
    t_train = time.time() - t0 - t_data

    print("[demo] evaluating on held-out clips")
    eval_cfg = OmegaConf.merge(s2.model, {"build_encoders": False})
    results = evaluate(eval_cfg, ck2, paths["eval"], out / "tokenizer", out / "features")
    md = table(results)
    misses = check_bars(results, cfg.bars)
    verdict = ("Every family clears its bar." if not misses else "Below the bar: " + "; ".join(misses) + ".")
    total = time.time() - t0
    summary = (f"{md}\n\n{verdict}\nData {t_data:.0f} s, training {t_train:.0f} s, total {total:.0f} s; "
               f"checkpoints: {ck1}, {ck2}\n")
    (out / "results.md").write_text(summary)
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=1))
    with (out / "answers.jsonl").open("w") as f:
        for r in results["rows"]:
            f.write(json.dumps(r) + "\n")
    print("\n" + summary)
    ask_one_clip(ck2, paths["eval"])
    return 0


def validate_stages(cfg: DictConfig, out: Path) -> None:
    """Refuse bad stage settings before minutes of data generation (paths are checked later)."""
    from nemo_avllm.training.train import validate

    for stage in (1, 2):
        try:
            validate(_stage_cfg(cfg, stage, out, {"stage1": out, "stage2": out}, str(out) if stage == 2 else None),
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


def held_out_question(eval_manifest: Path) -> tuple[Path, str, str]:
    """(video, question, expected answer) of one held-out clip with sound; the question without its
    modality token (the file decides the token), parsed as training parses it."""
    from nemo_avllm import modality

    items = [json.loads(line) for line in Path(eval_manifest).read_text().splitlines() if line.strip()]
    item = next((it for it in items if it["token"] == "<AUD_VIS>"), items[0])
    video = (Path(eval_manifest).parent / item["video"]).resolve()
    return video, modality.split_tokens(item["conversations"][-1]["value"])[1], item["answer"]


def ask_one_clip(checkpoint: Path, eval_manifest: Path) -> str:
    """`avllm generate` on one held-out clip with sound, from the raw file (as a user would)."""
    from nemo_avllm import config
    from nemo_avllm.inference.tasks import generate

    video, question, answer = held_out_question(eval_manifest)
    print(f"[demo] avllm generate checkpoint=\"'{checkpoint}'\" input={video} question=\"{question}\"")
    generate(config.load("generate", [f"checkpoint='{checkpoint}'", f"input='{video}'", f"question='{question}'",
                                      "sampling.max_new_tokens=32"]))
    print(f"[demo] (expected: {answer})")
    return answer
