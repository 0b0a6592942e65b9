"""`avllm demo`: the whole recipe in miniature, on CPU, from nothing.

1. a synthetic audio-visual dataset made with ffmpeg (`nemo_avllm.demo.clips`), or any
   manifest in the documented format via `train_manifest=`/`eval_manifest=`;
2. a small sentencepiece tokenizer trained on its text;
3. `prepare` (probe, FLAC side-cars, index) and `features` (frozen tiny CLIP/CLAP outputs cached);
4. stage 1 (projectors) then stage 2 (projectors + LLM) with the tiny model config, through the
   same entry point as cluster runs (`nemo_avllm.training.train.train`);
5. zero-shot evaluation on held-out clips: accuracy per question family and modality token,
   printed as a table and written to `<out_dir>/results.md` and `results.json`.

With `ablation=NAME` it runs one of the paper's ablations instead (`nemo_avllm.demo.ablation`).
The steps both share are in `demo.steps`, the scoring in `demo.scoring`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_avllm.demo.scoring import check_bars, evaluate, table
from nemo_avllm.demo.steps import (
    check_out_dir,
    encoder_seed_overrides,
    last_checkpoint,
    prepare_data,
    save_demo_encoders,
    stage_cfg,
    validate_stages,
)


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
    check_out_dir(out, cfg)
    paths = prepare_data(cfg, out)
    model_cfg = config.load_model(cfg.model, [f"allow_random_init={str(cfg.allow_random_init).lower()}",
                                              *encoder_seed_overrides(cfg, prefix="")])
    model_cfg = save_demo_encoders(model_cfg, out / "encoders", cfg.seed)
    print("[demo] features: running the frozen encoders once per clip")
    print(build_feature_cache(out / "prepared", out / "features", model_cfg, index=out / "prepared", dtype="fp32",
                              progress=cfg.progress_bar))
    t_data = time.time() - t0

    print("[demo] stage 1: projectors only (LLM and encoders frozen)")
    s1 = stage_cfg(cfg, 1, out, paths, None)
    _, _, log1 = train(s1)
    ck1 = last_checkpoint(Path(log1))
    print("[demo] stage 2: projectors + LLM, from", ck1)
    s2 = stage_cfg(cfg, 2, out, paths, str(ck1))
    _, _, log2 = train(s2)
    ck2 = last_checkpoint(Path(log2))
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
