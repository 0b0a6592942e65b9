"""`avllm demo`: the whole recipe in miniature, on CPU, from nothing.

1. a synthetic audio-visual dataset made with ffmpeg (`nemo_avllm.demo.synthetic`), or any
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
        "trainer.log_every_n_steps=10",
        f"trainer.enable_progress_bar={str(cfg.progress_bar).lower()}",
        *_dotted(OmegaConf.to_container(s, resolve=True)),
    ]
    return config.load(name, overrides)


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
    from nemo_avllm.data.dataset import stack_rows
    from nemo_avllm.data.features import FeatureCache
    from nemo_avllm.data.manifest import media_id, resolve_media_path
    from nemo_avllm.data.tokenizer import load_tokenizer
    from nemo_avllm.inference.generate import greedy_generate, normalize_answer, prompt_ids
    from nemo_avllm.model.avllm import EncoderFeatures
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    tok = load_tokenizer(tokenizer_dir)
    cache = FeatureCache(feature_cache, model_cfg)
    model = build_model(model_cfg)
    checkpoint.load(checkpoint_dir, model)
    items = [json.loads(line) for line in Path(eval_manifest).read_text().splitlines() if line.strip()]
    base = Path(eval_manifest).parent
    hits: dict[tuple[str, str], list[int]] = defaultdict(list)
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        feats = [cache.get(media_id(resolve_media_path(it["video"], base), None)) for it in chunk]
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
            rows.append({"id": it["id"], "family": it["family"], "token": it["token"], "answer": it["answer"],
                         "generated": text, "correct": ok})
    acc = {f"{fam}|{tokn}": sum(v) / len(v) for (fam, tokn), v in hits.items()}
    counts = {f"{fam}|{tokn}": len(v) for (fam, tokn), v in hits.items()}
    return {"accuracy": acc, "counts": counts, "rows": rows}


CHANCE = {"colour": 0.25, "shape": 1 / 3, "motion": 0.25, "pitch": 0.5, "loudness": 0.5, "sync": 0.5}


def table(results: dict) -> str:
    from nemo_avllm.demo.synthetic import FAMILIES

    toks = ["<VIS>", "<AUD>", "<AUD_VIS>"]
    lines = ["| question family | chance | " + " | ".join(f"`{t}`" for t in toks) + " |",
             "|---|---|" + "---|" * len(toks)]
    for fam in FAMILIES:
        cells = []
        for t in toks:
            key = f"{fam}|{t}"
            cells.append(f"{100 * results['accuracy'][key]:.0f}% (n={results['counts'][key]})" if key in results["accuracy"] else "–")
        lines.append(f"| {fam} | {100 * CHANCE[fam]:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg: DictConfig) -> int:
    from nemo_avllm import config
    from nemo_avllm.data.features import build_feature_cache
    from nemo_avllm.data.prepare import prepare
    from nemo_avllm.data.tokenizer import train_sentencepiece
    from nemo_avllm.demo import synthetic
    from nemo_avllm.training.train import train, validate

    t0 = time.time()
    out = Path(cfg.out_dir).resolve()
    for stage in (1, 2):  # refuse bad stage settings before minutes of data generation (paths come later)
        try:
            validate(_stage_cfg(cfg, stage, out, {"stage1": out, "stage2": out}, str(out) if stage == 2 else None),
                     paths=False)
        except UserError as e:
            raise UserError(f"stage{stage}.{e}") from e
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("train_manifest"):
        paths = {"stage1": Path(cfg.train_manifest), "stage2": Path(cfg.get("stage2_manifest") or cfg.train_manifest),
                 "eval": Path(cfg.eval_manifest)}
    else:
        print(f"[demo] generating {cfg.num_train} training and {cfg.num_eval} held-out clips with ffmpeg")
        paths = synthetic.generate(out / "data", cfg.num_train, cfg.num_eval, seed=cfg.seed, workers=cfg.num_workers or 2)
    print("[demo] training the tokenizer")
    train_sentencepiece(synthetic.corpus(paths), out / "tokenizer", vocab_size=int(cfg.tokenizer_vocab))
    print("[demo] prepare: probing clips, writing FLAC side-cars")
    sources = [str(paths["stage1"]), str(paths["stage2"]), str(paths["eval"])]
    print(prepare(sources, out / "prepared", num_workers=max(1, cfg.num_workers or 2), progress=cfg.progress_bar))
    model_cfg = config.load_model(cfg.model, [f"allow_random_init={str(cfg.allow_random_init).lower()}"])
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
    total = time.time() - t0
    summary = (f"{md}\n\nData {t_data:.0f} s, training {t_train:.0f} s, total {total:.0f} s; "
               f"checkpoints: {ck1}, {ck2}\n")
    (out / "results.md").write_text(summary)
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=1))
    with (out / "answers.jsonl").open("w") as f:
        for r in results["rows"]:
            f.write(json.dumps(r) + "\n")
    print("\n" + summary)
    ask_one_clip(ck2, paths["eval"])
    return 0


def save_demo_encoders(model_cfg, folder: Path, seed: int):
    """The demo's encoders are random (no downloads): build them from `seed` and save them in the
    open_clip / laion_clap layouts, so features, training and `avllm generate` on raw clips all
    use the same weights (the configs point at the files)."""
    import torch
    from safetensors.torch import save_file

    from nemo_avllm.data.features import build_encoders

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vision, audio = build_encoders(model_cfg)
    files = {"vision": folder / "vision.safetensors", "audio": folder / "audio.safetensors"}
    save_file({f"visual.{k}": v.contiguous() for k, v in vision.visual.state_dict().items()}, str(files["vision"]))
    save_file({f"module.audio_branch.{k}": v.contiguous() for k, v in audio.htsat.state_dict().items()},
              str(files["audio"]))
    model_cfg.vision.checkpoint, model_cfg.audio.checkpoint = str(files["vision"]), str(files["audio"])
    return model_cfg


def ask_one_clip(checkpoint: Path, eval_manifest: Path) -> str:
    """`avllm generate` on one held-out clip with sound, from the raw file (as a user would)."""
    from nemo_avllm import config
    from nemo_avllm.inference.run import generate

    items = [json.loads(line) for line in Path(eval_manifest).read_text().splitlines() if line.strip()]
    item = next((it for it in items if it["token"] == "<AUD_VIS>"), items[0])
    video = (Path(eval_manifest).parent / item["video"]).resolve()
    question = item["conversations"][-1]["value"].split(" ", 1)[1]  # the file decides the token
    print(f"[demo] avllm generate checkpoint=\"'{checkpoint}'\" input={video} question=\"{question}\"")
    generate(config.load("generate", [f"checkpoint='{checkpoint}'", f"input='{video}'", f"question='{question}'",
                                      "sampling.max_new_tokens=32"]))
    print(f"[demo] (expected: {item['answer']})")
    return item["answer"]
