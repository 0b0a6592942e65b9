"""The demo's held-out evaluation: greedy answers scored per question family and modality token,
the results table and the bars they are held to (conf/demo.yaml `bars`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


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
