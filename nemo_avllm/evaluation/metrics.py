"""Metrics of the paper's tables that need no judge: closed-vocabulary accuracy, multiple choice
(answer-letter extraction), label match (AVSSD) and BLEU-1..4 / CIDEr with pycocoevalcap.

Each scorer takes `{qid: prediction}` and the benchmark's `EvalItem`s and returns a dict with the
score, N, and the per-question outcome, so nothing is dropped silently: an answer with no
recognisable option letter counts as wrong and is reported as `unparseable`.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

from nemo_avllm.evaluation.benchmarks import EvalItem, avssd_label
from nemo_avllm.inference.generate import normalize_answer

LETTERS = string.ascii_uppercase


def _by_group(items: list[EvalItem], ok: dict[str, bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for it in items:
        if it.qid in ok and "type" in it.meta:
            groups[str(it.meta["type"])].append(ok[it.qid])
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def exact_accuracy(preds: dict[str, str], items: list[EvalItem]) -> dict:
    """Closed vocabulary (MUSIC-AVQA): the normalised answer must equal the reference; a longer
    answer counts when its first word or its last word is the reference ("Two." / "There are two")."""
    ok = {}
    for it in items:
        if it.qid not in preds:
            continue
        p, ref = normalize_answer(preds[it.qid]).split(), normalize_answer(str(it.answer))
        ok[it.qid] = bool(p) and (" ".join(p) == ref or p[0] == ref or p[-1] == ref)
    return {"accuracy": sum(ok.values()) / max(len(ok), 1), "n": len(ok), "by_type": _by_group(items, ok), "correct": ok}


def choice_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice question as asked (lettered options, answer with the letter)."""
    lines = [question] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


def extract_choice(text: str, options: list[str]) -> int | None:
    """The chosen option's index from a free-form answer: "(B)", "B.", "B)", "Answer: B", a lone
    "B", or an answer that repeats exactly one option's text. None when nothing is recognisable."""
    n = len(options)
    valid = LETTERS[:n]
    t = text.strip()
    for pat in (rf"\(([{valid}])\)", rf"(?:answer|option)\s*(?:is)?\s*:?\s*\(?([{valid}])\b", rf"^([{valid}])(?:[.):,\s]|$)"):
        m = re.search(pat, t, flags=re.IGNORECASE if "answer" in pat else 0)
        if m:
            return valid.index(m.group(1).upper())
    norm = normalize_answer(t)
    hits = [i for i, o in enumerate(options) if normalize_answer(o) and normalize_answer(o) in norm]
    if len(hits) == 1:
        return hits[0]
    return None


def choice_accuracy(preds: dict[str, str], items: list[EvalItem]) -> dict:
    """Multiple choice (NExT-QA, MVBench)."""
    ok, unparseable = {}, []
    for it in items:
        if it.qid not in preds:
            continue
        k = extract_choice(preds[it.qid], it.options or [])
        if k is None:
            unparseable.append(it.qid)
        ok[it.qid] = k is not None and k == it.meta["answer_index"]
    return {"accuracy": sum(ok.values()) / max(len(ok), 1), "n": len(ok), "unparseable": len(unparseable),
            "unparseable_ids": unparseable, "by_type": _by_group(items, ok), "correct": ok}


def label_accuracy(preds: dict[str, str], items: list[EvalItem]) -> dict:
    """AVSSD without a judge: the VGGSound class of the reference sentence appears in the answer."""
    ok, no_label = {}, []
    for it in items:
        if it.qid not in preds:
            continue
        label = it.meta.get("label") or avssd_label(str(it.answer))
        if not label:
            no_label.append(it.qid)
            continue
        ok[it.qid] = normalize_answer(label) in normalize_answer(preds[it.qid])
    return {"accuracy": sum(ok.values()) / max(len(ok), 1), "n": len(ok), "no_label": no_label, "correct": ok}


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------
_CONTRACTIONS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'m|'d)\b")


def ptb_tokenize(text: str) -> str:
    """Python stand-in for pycocoevalcap's Stanford PTB tokenisation (Java): lower case,
    contractions split ("isn't" -> "is n't"), punctuation split off and then removed with the
    same punctuation list pycocoevalcap removes."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    t = _CONTRACTIONS.sub(r"\1 \2", text.lower().replace("\n", " "))
    tokens = re.findall(r"n't|'\w+|\w+(?:[-']\w+)*|\.\.\.|--|[^\w\s]", t)
    return " ".join(w for w in tokens if w not in PUNCTUATIONS)


def caption_scores(preds: dict[str, str], items: list[EvalItem]) -> dict:
    """BLEU-1..4 and CIDEr (pycocoevalcap's scorers; CIDEr's document frequencies come from the
    references of the scored set, as in the COCO evaluation)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {it.qid: [ptb_tokenize(preds[it.qid])] for it in items if it.qid in preds}
    gts = {it.qid: [ptb_tokenize(r) for r in it.answer] for it in items if it.qid in preds}
    if not res:
        return {"n": 0}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per = Cider().compute_score(gts, res)
    out = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    out.update({"CIDEr": float(cider), "n": len(res), "tokenizer": "python-ptb"})
    return out
