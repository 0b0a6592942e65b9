"""Metrics of the paper's tables that need no judge: closed-vocabulary accuracy, multiple choice
(letters or option texts), label match (AVSSD) and BLEU-1..4, METEOR, ROUGE-L and CIDEr with
pycocoevalcap (its own Java PTB tokenizer when Java is present).
A right answer scores whatever its phrasing: number words equal digits, articles are ignored.

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


NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100"})


def canonical(text: str) -> list[str]:
    """Words compared by every judge-free scorer: `normalize_answer` (lower case, no punctuation or
    articles) with number words as digits, so "Two." and "2" are the same answer."""
    return [NUMBERS.get(w, w) for w in normalize_answer(text).split()]


def _is_number(w: str) -> bool:
    return w.isdigit()


def closed_match(prediction: str, reference: str) -> bool:
    """A closed-vocabulary answer is right when, after `canonical`, it is the reference or starts or
    ends with it ("Two." / "There are 2" / "more than 10"), and names no rival answer: yes and no
    both, or another number than the reference's."""
    p, ref = canonical(prediction), canonical(reference)
    if not p or not ref:
        return False
    n = len(ref)
    if not (p == ref or p[:n] == ref or p[-n:] == ref):
        return False
    if {"yes", "no"} <= set(p):
        return False
    return not ({w for w in p if _is_number(w)} - {w for w in ref if _is_number(w)})


def _accuracy(ok: dict[str, bool]) -> float | None:
    """None (not 0.0) when nothing was scored: an empty run must not read as a score."""
    return sum(ok.values()) / len(ok) if ok else None


def exact_accuracy(preds: dict[str, str], items: list[EvalItem]) -> dict:
    """Closed vocabulary (MUSIC-AVQA), by `closed_match`."""
    ok = {it.qid: closed_match(preds[it.qid], str(it.answer)) for it in items if it.qid in preds}
    return {"accuracy": _accuracy(ok), "n": len(ok), "by_type": _by_group(items, ok), "correct": ok}


def choice_prompt(question: str, options: list[str]) -> str:
    """The multiple-choice question as asked (lettered options, answer with the letter)."""
    lines = [question] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


_LEAD = re.compile(r"^\s*(?:(?:the\s+)?(?:correct\s+|best\s+)?(?:answer|option|choice)\b\s*(?:is|would be)?\s*[:\-]?\s*)",
                   re.I)


def extract_choice(text: str, options: list[str]) -> int | None:
    """The chosen option's index from a free-form answer, or None when nothing is recognisable.

    A letter counts when it stands as a letter: "(B)", "[b]", "B.", "B)", "Answer: b", a lone "b";
    never the article in "A cloth ..." or "The answer is a cloth". Otherwise the option's text, with
    or without an article, trailing punctuation or "The answer is": the option equal to the answer,
    else the one option the answer contains (the longest, when the others are inside it)."""
    n = len(options)
    if not n:
        return None
    valid = LETTERS[:n] + LETTERS[:n].lower()
    t = text.strip()
    end = r"(?=\s*$|\s*[.):,;\]])"
    bracketed = {m.upper() for m in re.findall(rf"[(\[]([{valid}])[)\]]", t)}
    if len(bracketed) == 1:
        return LETTERS.index(bracketed.pop())
    body = _LEAD.sub("", t, count=1)
    for pat in (rf"^([{valid}]){end}", rf"^([{valid}])\s*[.):]"):
        m = re.match(pat, body)
        if m:
            return LETTERS.index(m.group(1).upper())
    pred = canonical(body)
    opts = [canonical(o) for o in options]
    exact = [i for i, o in enumerate(opts) if o and o == pred]
    if len(exact) == 1:
        return exact[0]
    padded = f" {' '.join(pred)} "
    inside = [i for i, o in enumerate(opts) if o and f" {' '.join(o)} " in padded]
    best = [i for i in inside if all(f" {' '.join(opts[j])} " in f" {' '.join(opts[i])} " for j in inside)]
    return best[0] if len(best) == 1 else None


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
    return {"accuracy": _accuracy(ok), "n": len(ok), "unparseable": len(unparseable),
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
        ok[it.qid] = f" {' '.join(canonical(label))} " in f" {' '.join(canonical(preds[it.qid]))} "
    return {"accuracy": _accuracy(ok), "n": len(ok), "no_label": no_label, "correct": ok}


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------
_CONTRACTIONS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'m|'d)\b")


def ptb_tokenize(text: str) -> str:
    """Python stand-in for pycocoevalcap's Stanford PTB tokenisation (Java), used only without
    Java: lower case, contractions split ("isn't" -> "is n't"), punctuation split off and then
    removed with the same list pycocoevalcap removes. It differs from the Java tokenizer on
    numbers, times, abbreviations and brackets: its scores are not comparable to published ones."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    t = _CONTRACTIONS.sub(r"\1 \2", text.lower().replace("\n", " "))
    tokens = re.findall(r"n't|'\w+|\w+(?:[-']\w+)*|\.\.\.|--|[^\w\s]", t)
    return " ".join(w for w in tokens if w not in PUNCTUATIONS)


def java_available() -> bool:
    """pycocoevalcap's PTB tokenizer and METEOR run on Java (scripts/setup.sh installs a JRE)."""
    import shutil
    import subprocess

    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tokenize_captions(captions: dict[str, list[str]]) -> tuple[dict[str, list[str]], str]:
    """`{id: [sentence, ...]}` tokenised as the COCO caption evaluation does: pycocoevalcap's own
    Stanford PTB tokenizer when Java is present, else the Python stand-in (named in the results)."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()}), "ptb-java"
    return {k: [ptb_tokenize(c) for c in v] for k, v in captions.items()}, "python-ptb (no Java: not comparable)"


def caption_scores(preds: dict[str, str], items: list[EvalItem], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap's scorers; CIDEr's document frequencies
    come from the references of the scored set, as in the COCO evaluation). METEOR needs Java:
    without it the results say so instead of a number; it loads its paraphrase table (~30 s on
    2 cores), so `meteor=False` skips it where only the others are wanted."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    done = [it for it in items if it.qid in preds]
    if not done:
        return {"n": 0}
    # one tokenizer call for predictions and references (one Java start)
    both, tokenizer = tokenize_captions({**{f"p{it.qid}": [preds[it.qid]] for it in done},
                                         **{f"r{it.qid}": list(it.answer) for it in done}})
    res = {it.qid: both[f"p{it.qid}"] for it in done}
    gts = {it.qid: both[f"r{it.qid}"] for it in done}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    if tokenizer == "ptb-java" and meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.wait(timeout=60)
    elif meteor:
        out["METEOR_note"] = "METEOR needs Java (scripts/setup.sh installs openjdk-17-jre-headless)"
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out.update({"n": len(res), "tokenizer": tokenizer})
    return out
