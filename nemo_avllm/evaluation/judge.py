"""The Video-ChatGPT judge protocol through any OpenAI-compatible endpoint (`openai` client).

QA accuracy/score (Tables 2): the judge reads question, reference and prediction and answers a
Python dict `{'pred': 'yes'|'no', 'score': 0..5}`; accuracy is the share of "yes", score the mean.
The Table 9 dimensions (correctness, detail, context, temporal) ask for `{'score': 1..5}`.

Pinned and recorded with every result: base URL, model, temperature, prompt version. The API key
is read from the environment variable named in the config, never from a file. Every judgment is
cached on disk under `sha256(model, temperature, messages)`: reruns and resumed runs never pay
twice. 429s, 5xx and timeouts are retried with exponential back-off; a reply that cannot be
parsed is counted as `unparseable` and reported, never dropped or guessed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PROMPT_VERSION = "video-chatgpt-qa-v1"

QA_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases "
    "as valid matches.\n- Evaluate the correctness of the prediction compared to the answer."
)
QA_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {prediction}\n\nProvide your evaluation only as a yes/no and score where the score "
    "is an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
    "response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  "
    "a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT "
    "TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, your response should look "
    "like this: {{'pred': 'yes', 'score': 4.8}}."
)
DIMENSIONS = {  # Video-ChatGPT's evaluation criteria, one judge call per dimension
    "correctness": "the factual accuracy of the predicted answer compared to the correct answer",
    "detail": "how complete and detailed the predicted answer is, covering the video's relevant points",
    "context": "how well the predicted answer fits the context of the video and the question",
    "temporal": "how well the predicted answer understands the order and timing of events in the video",
}
DIM_USER = (
    "Please evaluate the following video-based question-answer pair for {criterion}.\n\nQuestion: {question}\n"
    "Correct Answer: {answer}\nPredicted Answer: {prediction}\n\nProvide your evaluation only as an integer score "
    "between 1 and 5, 5 being the best. Please generate the response in the form of a Python dictionary string "
    "with key 'score'. DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. For example: {{'score': 4}}."
)
DIM_SYSTEM = ("You are an intelligent chatbot designed for evaluating generative outputs for video-based "
              "question-answer pairs. Score strictly by the requested criterion.")


@dataclass
class JudgeConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo-0613"  # Video-ChatGPT's judge; pin a dated model
    temperature: float = 0.0
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str = "checkpoints/judge_cache"
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 2.0  # first retry delay; doubles each time
    usd_per_1k_prompt_tokens: float = 0.0
    usd_per_1k_completion_tokens: float = 0.0

    def record(self) -> dict:
        """What a results file records about the judge (no key)."""
        d = asdict(self)
        d.pop("cache_dir")
        d["prompt_version"] = PROMPT_VERSION
        return d


@dataclass
class Verdict:
    yes: bool | None  # QA: the judge's yes/no (None: unparseable)
    score: float | None
    raw: str
    cached: bool = False


def parse_reply(text: str, want_pred: bool = True) -> tuple[bool | None, float | None]:
    """The judge's dict, tolerant of code fences, double quotes, prose around it, "4/5" scores.
    (None, None) when no score (or, for QA, no yes/no) can be found."""
    pred = score = None
    m = re.search(r"\{.*?\}", text, flags=re.S)
    if m:
        try:
            d = ast.literal_eval(m.group(0))
            if isinstance(d, dict):
                pred = d.get("pred")
                score = d.get("score")
        except (ValueError, SyntaxError):
            pass
    if pred is None:
        m = re.search(r"['\"]?pred['\"]?\s*[:=]\s*['\"]?(yes|no)\b", text, flags=re.I)
        pred = m.group(1) if m else None
    if score is None:
        m = re.search(r"['\"]?score['\"]?\s*[:=]\s*['\"]?(\d+(?:\.\d+)?)", text, flags=re.I)
        score = m.group(1) if m else None
    try:
        score = float(score) if score is not None else None
    except (TypeError, ValueError):
        score = None
    yes = None
    if isinstance(pred, str) and pred.strip().lower() in ("yes", "no"):
        yes = pred.strip().lower() == "yes"
    if score is None or (want_pred and yes is None):
        return None, None
    return yes, score


@dataclass
class Usage:
    calls: int = 0
    cached: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list = field(default_factory=list)


class Judge:
    def __init__(self, cfg: JudgeConfig):
        from openai import OpenAI

        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"the judge's API key is read from the environment: set {cfg.api_key_env} "
                             f"(or judge.api_key_env=<another variable>)")
        self.cfg = cfg
        self.client = OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
        self.cache = Path(cfg.cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.usage = Usage()

    def _key(self, messages: list[dict]) -> str:
        blob = json.dumps({"model": self.cfg.model, "temperature": self.cfg.temperature, "messages": messages},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def complete(self, messages: list[dict]) -> tuple[str, bool]:
        """The judge's reply text (from the cache when asked before) and whether it was cached."""
        import openai

        path = self.cache / f"{self._key(messages)}.json"
        if path.is_file():
            self.usage.cached += 1
            return json.loads(path.read_text())["reply"], True
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            try:
                r = self.client.chat.completions.create(model=self.cfg.model, messages=messages,
                                                        temperature=self.cfg.temperature)
                break
            except (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError,
                    openai.InternalServerError) as e:
                if attempt == self.cfg.max_retries:
                    raise RuntimeError(f"judge {self.cfg.base_url} ({self.cfg.model}) failed after "
                                       f"{attempt + 1} attempts: {e}") from e
                self.usage.retries += 1
                log.warning("judge: %s; retrying in %.1f s", type(e).__name__, delay)
                time.sleep(delay)
                delay *= 2
        reply = r.choices[0].message.content or ""
        self.usage.calls += 1
        if r.usage is not None:
            self.usage.prompt_tokens += int(r.usage.prompt_tokens or 0)
            self.usage.completion_tokens += int(r.usage.completion_tokens or 0)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": self.cfg.model, "messages": messages, "reply": reply}))
        os.replace(tmp, path)
        return reply, False

    def qa(self, question: str, answer: str, prediction: str) -> Verdict:
        msgs = [{"role": "system", "content": QA_SYSTEM},
                {"role": "user", "content": QA_USER.format(question=question, answer=answer, prediction=prediction)}]
        reply, cached = self.complete(msgs)
        yes, score = parse_reply(reply)
        return Verdict(yes, score, reply, cached)

    def dimension(self, dim: str, question: str, answer: str, prediction: str) -> Verdict:
        if dim not in DIMENSIONS:
            raise ValueError(f"judge dimension {dim!r}; known: {sorted(DIMENSIONS)}")
        msgs = [{"role": "system", "content": DIM_SYSTEM},
                {"role": "user", "content": DIM_USER.format(criterion=DIMENSIONS[dim], question=question,
                                                            answer=answer, prediction=prediction)}]
        reply, cached = self.complete(msgs)
        _, score = parse_reply(reply, want_pred=False)
        return Verdict(None, score, reply, cached)

    def cost_usd(self) -> float:
        u = self.usage
        return (u.prompt_tokens * self.cfg.usd_per_1k_prompt_tokens + u.completion_tokens
                * self.cfg.usd_per_1k_completion_tokens) / 1000.0


def judge_qa(judge: Judge, preds: dict[str, str], items, dimensions: list[str] = ()) -> dict:
    """Accuracy (share of "yes") and mean score over the answered items; unparseable replies are
    counted (and excluded from both), with their ids."""
    yes, scores, unparseable = {}, [], []
    dims: dict[str, list[float]] = {d: [] for d in dimensions}
    for it in items:
        if it.qid not in preds:
            continue
        v = judge.qa(it.question, str(it.answer), preds[it.qid])
        if v.yes is None:
            unparseable.append(it.qid)
        else:
            yes[it.qid] = v.yes
            scores.append(v.score)
        for d in dimensions:
            s = judge.dimension(d, it.question, str(it.answer), preds[it.qid]).score
            if s is None:
                unparseable.append(f"{it.qid}:{d}")
            else:
                dims[d].append(s)
    u = judge.usage
    out = {"accuracy": sum(yes.values()) / max(len(yes), 1), "score": sum(scores) / max(len(scores), 1),
           "n": len(yes), "unparseable": len(unparseable), "unparseable_ids": unparseable,
           "judge": judge.cfg.record(),
           "judge_usage": {"calls": u.calls, "cached": u.cached, "retries": u.retries, "prompt_tokens": u.prompt_tokens,
                           "completion_tokens": u.completion_tokens, "cost_usd": round(judge.cost_usd(), 6)},
           "correct": yes}
    for d, v in dims.items():
        out[f"dim_{d}"] = sum(v) / max(len(v), 1)
    return out
