"""Step 2 of the curation (paper §3.2, Table 1): instruction data from the fused captions.

Nine cells: three instruction types (detailed descriptions, multi-turn conversations, complex
reasoning) x three modalities (V: visual, A: audio, AV: audio-visual). `plan` turns the targets
(Table 1's proportions scaled to the number of videos, or absolute counts) into one LLM request
per item, spread evenly over the videos that can serve the cell (A and AV need an audio track).
`generate` asks the LLM (ROLE / REQUIREMENT / EXAMPLE / CONTEXT) for each; `to_manifest_line`
writes an item in the training format with the modality token of its cell in the first human turn.
"""

from __future__ import annotations

import heapq
import random
import re
from dataclasses import dataclass, field

from nemo_avllm import modality
from nemo_avllm.curation.prompts import MODALITIES, TYPES

TOKEN = {"V": modality.VIS_TOKEN, "A": modality.AUD_TOKEN, "AV": modality.AUD_VIS_TOKEN}
NEEDS_AUDIO = {"V": False, "A": True, "AV": True}
# Table 1 (thousands of items): the default proportions.
TABLE1 = {"description": {"V": 50, "A": 20, "AV": 30},
          "conversation": {"V": 60, "A": 20, "AV": 40},
          "reasoning": {"V": 20, "A": 5, "AV": 15}}
STAGE1_TYPES = ("description",)  # stage-1 manifest; the other types go to the stage-2 manifest

_TOKEN_LIKE = re.compile(r"<[A-Za-z][A-Za-z0-9_]*>")


@dataclass(frozen=True)
class Request:
    video_id: str
    itype: str  # description | conversation | reasoning
    modality: str  # V | A | AV
    variant: int = 0  # > 0 when a video serves the same cell more than once

    @property
    def uid(self) -> str:
        return f"{self.video_id}-{self.itype}-{self.modality}-{self.variant}"


@dataclass
class Item:
    """One generated instruction sample (before verification)."""

    request: Request
    pairs: list[tuple[str, str]]  # (question, answer)
    context: str  # the fused caption it was generated from
    scores: dict = field(default_factory=dict)  # filled by verification

    @property
    def uid(self) -> str:
        return self.request.uid

    def text(self) -> str:
        return "\n".join(f"Q: {q}\nA: {a}" for q, a in self.pairs)

    def answers(self) -> str:
        return " ".join(a for _, a in self.pairs)


def largest_remainder(weights: dict, total: int) -> dict:
    """Integers proportional to `weights` that sum to `total`."""
    s = float(sum(weights.values()))
    if total <= 0 or s <= 0:
        return {k: 0 for k in weights}
    raw = {k: total * w / s for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: total - sum(out.values())]:
        out[k] += 1
    return out


def targets(cfg, num_videos: int) -> dict[tuple[str, str], int]:
    """(type, modality) -> number of items: `cfg.counts` when given, else `per_video * videos`
    split by `cfg.proportions` (Table 1 by default)."""
    cells = [(t, m) for t in TYPES for m in MODALITIES]
    if cfg.get("counts"):
        counts = cfg.counts
        unknown = [t for t in counts if t not in TYPES]
        if unknown:
            raise ValueError(f"instructions.counts: unknown instruction type(s) {unknown}; use {list(TYPES)}")
        return {(t, m): int((counts.get(t) or {}).get(m, 0)) for t, m in cells}
    props = cfg.get("proportions") or TABLE1
    weights = {(t, m): float((props.get(t) or {}).get(m, 0)) for t, m in cells}
    return largest_remainder(weights, int(round(float(cfg.per_video) * num_videos)))


def plan(cell_targets: dict, videos: dict[str, bool], seed: int = 0) -> tuple[list[Request], dict]:
    """Spread each cell's target over the videos that can serve it (audio cells: videos with audio),
    the least-loaded first, in a seeded order. -> (requests, shortfall per cell without any video)."""
    rng = random.Random(seed)
    order = sorted(videos)
    rng.shuffle(order)
    load = {v: 0 for v in order}
    rank = {v: i for i, v in enumerate(order)}
    used: dict[tuple, int] = {}
    requests, short = [], {}
    # scarce cells first, so audio videos are not used up by visual cells
    for (t, m), n in sorted(cell_targets.items(), key=lambda kv: (not NEEDS_AUDIO[kv[0][1]], kv[0])):
        if n <= 0:
            continue
        eligible = [v for v in order if videos[v] or not NEEDS_AUDIO[m]]
        if not eligible:
            short[f"{t}/{m}"] = n
            continue
        # least-loaded video first; ties keep the seeded order
        heap = [(load[v], rank[v], v) for v in eligible]
        heapq.heapify(heap)
        for _ in range(n):
            _, r, v = heapq.heappop(heap)
            k = used.get((v, t, m), 0)
            used[(v, t, m)] = k + 1
            load[v] += 1
            heapq.heappush(heap, (load[v], r, v))
            requests.append(Request(v, t, m, k))
    return requests, short


def clean(text: str) -> str:
    """Model text without anything shaped like a modality token (only the pipeline places those)."""
    return re.sub(r"\s+", " ", _TOKEN_LIKE.sub("", str(text))).strip()


def check_reply(parsed) -> list[tuple[str, str]]:
    """{"conversations": [{"question", "answer"}, ...]} -> pairs; ValueError (re-ask) otherwise."""
    if isinstance(parsed, list):
        parsed = {"conversations": parsed}
    if not isinstance(parsed, dict) or not isinstance(parsed.get("conversations"), list):
        raise ValueError('expected {"conversations": [{"question": ..., "answer": ...}]}')
    pairs = []
    for i, turn in enumerate(parsed["conversations"]):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}] is not an object")
        q, a = clean(turn.get("question", "")), clean(turn.get("answer", ""))
        if not q or not a:
            raise ValueError(f"conversations[{i}] needs a non-empty question and answer")
        pairs.append((q, a))
    if not pairs:
        raise ValueError("conversations is empty")
    return pairs


def to_manifest_line(item: Item, video: str, audio: str | None) -> dict:
    """The training format (data/manifest.py): the cell's modality token opens the first human turn."""
    turns = []
    for i, (q, a) in enumerate(item.pairs):
        turns.append({"from": "human", "value": f"{TOKEN[item.request.modality]} {q}" if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    line = {"id": item.uid, "video": video}
    if audio:
        line["audio"] = audio
    line["conversations"] = turns
    line["curation"] = {"type": item.request.itype, "modality": item.request.modality,
                        **({"scores": item.scores} if item.scores else {})}
    return line
