"""The Video-ChatGPT judge protocol through any OpenAI-compatible endpoint (`openai` client).

QA accuracy/score (Tables 2): the judge reads question, reference and prediction and answers a
Python dict `{'pred': 'yes'|'no', 'score': 0..5}`; accuracy is the share of "yes", score the mean.
The Table 9 dimensions (correctness, detail, context, temporal) ask for `{'score': 1..5}` per
answer; consistency reads the answers to two phrasings of one question (Video-ChatGPT's
`consistency_qa.json`: items paired by `meta["pair"]`) and asks for `{'score': 0..5}`.

Pinned and recorded with every result: base URL, model, temperature, prompt version, and the model
id the server says answered. The calls go through the shared
`nemo_avllm.runtime.openai_client.ChatClient` (the curation's client too): the API key from the
environment variable named in the config only, every judgment cached on disk by model + prompt
version + messages, retries with back-off on 429/5xx/timeouts, up to `max_concurrency` requests at
once, tokens and cost counted. `Judge.probe()` sends one request before any answer is generated,
so a missing key, a wrong URL or a retired model stops the run at its start, naming the
`judge.client.*` key. A reply that cannot be parsed is asked again (`json_retries` times), never
cached, and then counted as `unparseable` and reported, never dropped or guessed.

The paper follows Video-ChatGPT, whose judge was `gpt-3.5-turbo` (0613 at the time); OpenAI
retired that snapshot in 2024 and the whole gpt-3.5-turbo family in 2026 (its named substitute:
gpt-4.1-mini). The default is that substitute's dated snapshot; scores from different judges are
not comparable to each other (Video-ChatGPT issue #28), so the judge is recorded with each result.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from dataclasses import asdict, dataclass

from nemo_avllm.errors import UserError
from nemo_avllm.runtime.disk_cache import JsonDir
from nemo_avllm.runtime.openai_client import OPENAI_DEFAULT_URL, ChatClient, LLMError, UnusableReply, map_concurrent

log = logging.getLogger(__name__)

PROMPT_VERSION = "video-chatgpt-qa-v2"

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
# consistency: the same question asked two ways, one reference answer (Video-ChatGPT's benchmark 5)
CONSISTENCY = "consistency"
CONS_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the consistency of generative outputs for two very "
    "similar video-based questions. You are given both questions, one correct answer common to both, and the "
    "predicted answer to each question. Decide whether the two predicted answers are consistent.------"
    "##INSTRUCTIONS: - Both predicted answers should agree with the correct answer and with each other, with no "
    "contradictions or significant differences in the information they convey about the video.\n- Consider "
    "synonyms or paraphrases as matches only when the conveyed information stays the same.\n- Evaluate the "
    "consistency of the two predicted answers against the correct answer."
)
CONS_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion 1: {question1}\nQuestion 2: "
    "{question2}\nCorrect Answer: {answer}\nPredicted Answer to Question 1: {prediction1}\nPredicted Answer to "
    "Question 2: {prediction2}\n\nProvide your evaluation only as a consistency score, an integer value between "
    "0 and 5, with 5 indicating the highest level of consistency. Please generate the response in the form of a "
    "Python dictionary string with key 'score', where its value is the consistency score in INTEGER, not STRING. "
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, "
    "your response should look like this: {{'score': 4}}."
)


@dataclass
class JudgeConfig:
    """conf/evaluate.yaml `judge.client` (the `ChatClient` settings, plus where the cache lives)."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4.1-mini-2025-04-14"  # pinned; Video-ChatGPT's gpt-3.5-turbo-0613 is retired (module doc)
    temperature: float = 0.0
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str = "checkpoints/judge_cache"
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 2.0  # first retry delay; doubles each time (with jitter, or the server's Retry-After)
    backoff_max_s: float = 60.0
    max_tokens: int | None = None  # null: the server's default, as the Video-ChatGPT protocol
    requests_per_minute: float = 0.0  # 0: no rate limit
    max_concurrency: int = 8  # judge requests in flight at once
    json_retries: int = 2  # an unparseable reply is asked again this many times (never cached)
    price_per_1m_input: float = 0.0  # USD, for the cost in the results
    price_per_1m_output: float = 0.0

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


def _reader(want_pred: bool):
    """`parse_reply` for `ChatClient.chat(parse=...)`: a ValueError re-asks (and is never cached)."""

    def read(text: str) -> tuple[bool | None, float, str]:
        yes, score = parse_reply(text, want_pred)
        if score is None:
            raise ValueError("expected a Python dict with " + ("'pred' and 'score'" if want_pred else "'score'"))
        return yes, score, text
    return read


class Judge:
    def __init__(self, cfg: JudgeConfig):
        """Refuses (naming `judge.client.*`) a config whose key is missing, before any request."""
        self.cfg = cfg
        if str(cfg.base_url).rstrip("/") == OPENAI_DEFAULT_URL and not os.environ.get(cfg.api_key_env or "OPENAI_API_KEY"):
            raise UserError(f"judge.client.base_url is OpenAI's API but the environment variable named by "
                            f"judge.client.api_key_env ({cfg.api_key_env}) is not set: export {cfg.api_key_env}=<key>, "
                            f"point judge.client.base_url at a local OpenAI-compatible server, or set judge.enabled=false")
        self.client = ChatClient(cfg, PROMPT_VERSION)
        self.cache = JsonDir(cfg.cache_dir)
        self.cache.dir.mkdir(parents=True, exist_ok=True)

    @property
    def usage(self):
        return self.client.usage

    def probe(self) -> str:
        """One short request (not cached) before any answer is generated; returns the model id the
        server reports. A failure is a `UserError` naming the `judge.client.*` key to fix."""
        try:
            self.client.chat("judge_probe", [{"role": "user", "content": "Reply with the word OK."}])
        except LLMError as e:
            cause = e.__cause__
            status = getattr(cause, "status_code", None)
            c = self.cfg
            if status == 404:
                what = (f"judge.client.model={c.model}: the server at judge.client.base_url={c.base_url} does not serve "
                        f"it (404); set judge.client.model to a model it serves")
            elif status in (401, 403):
                what = (f"judge.client.api_key_env={c.api_key_env}: the server at judge.client.base_url={c.base_url} "
                        f"refused the key ({status}); export a valid key in {c.api_key_env}")
            else:
                what = (f"judge.client.base_url={c.base_url} (judge.client.model={c.model}) did not answer a test "
                        f"request: {type(cause or e).__name__}: {cause or e}; check the URL and that the server runs")
            raise UserError(f"{what} (or judge.enabled=false to score without the judge)") from e
        return ", ".join(sorted(self.client.served_models)) or str(self.cfg.model)

    def _ask(self, stage: str, system: str, user: str, want_pred: bool) -> Verdict:
        try:
            yes, score, raw = self.client.chat(
                stage, [{"role": "system", "content": system}, {"role": "user", "content": user}], self.cache,
                parse=_reader(want_pred))
        except UnusableReply as e:
            return Verdict(None, None, str(e))
        return Verdict(yes, score, raw)

    def qa(self, question: str, answer: str, prediction: str) -> Verdict:
        return self._ask("judge_qa", QA_SYSTEM, QA_USER.format(question=question, answer=answer, prediction=prediction),
                         True)

    def dimension(self, dim: str, question: str, answer: str, prediction: str) -> Verdict:
        if dim not in DIMENSIONS:
            raise ValueError(f"judge dimension {dim!r}; known: {sorted(DIMENSIONS) + [CONSISTENCY]}")
        return self._ask(f"judge_{dim}", DIM_SYSTEM, DIM_USER.format(criterion=DIMENSIONS[dim], question=question,
                                                                     answer=answer, prediction=prediction), False)

    def consistency(self, questions: tuple[str, str], answer: str, predictions: tuple[str, str]) -> Verdict:
        """One score for the answers to two phrasings of the same question."""
        return self._ask("judge_consistency", CONS_SYSTEM, CONS_USER.format(
            question1=questions[0], question2=questions[1], answer=answer, prediction1=predictions[0],
            prediction2=predictions[1]), False)

    def cost_usd(self) -> float:
        return self.usage.cost(self.cfg.price_per_1m_input, self.cfg.price_per_1m_output)


def _pairs(items, preds: dict[str, str]) -> tuple[list[tuple], int]:
    """(pair id, (item1, item2)) for the consistency pairs whose two questions were both answered,
    and how many pairs lack an answer."""
    groups: dict[str, list] = {}
    for it in items:
        if it.meta.get("pair") is not None:
            groups.setdefault(str(it.meta["pair"]), []).append(it)
    done = [(k, tuple(sorted(v, key=lambda it: it.meta.get("phrasing", 0)))) for k, v in groups.items()
            if len(v) == 2 and all(it.qid in preds for it in v)]
    return done, len(groups) - len(done)


def judge_qa(judge: Judge, preds: dict[str, str], items, dimensions: list[str] = ()) -> dict:
    """Accuracy (share of "yes") and mean score over the answered items; unparseable replies are
    counted (and excluded from both), with their ids."""
    unknown = [d for d in dimensions if d not in DIMENSIONS and d != CONSISTENCY]
    if unknown:
        raise ValueError(f"judge.dimensions: unknown {unknown}; known: {sorted(DIMENSIONS) + [CONSISTENCY]}")
    everything, items = items, [it for it in items if it.qid in preds]
    calls = [("qa", it, None) for it in items] + [(d, it, None) for it in items for d in dimensions if d != CONSISTENCY]
    extra, pairs, unanswered = {}, [], 0
    if CONSISTENCY in dimensions:
        pairs, unanswered = _pairs(everything, preds)
        calls += [(CONSISTENCY, pair, key) for key, pair in pairs]

    def ask(call) -> Verdict:
        what, it, _ = call
        if what == "qa":
            return judge.qa(it.question, str(it.answer), preds[it.qid])
        if what == CONSISTENCY:
            a, b = it
            return judge.consistency((a.question, b.question), str(a.answer), (preds[a.qid], preds[b.qid]))
        return judge.dimension(what, it.question, str(it.answer), preds[it.qid])

    verdicts = map_concurrent(ask, calls, judge.cfg.max_concurrency)
    yes, scores, unparseable = {}, [], []
    dims: dict[str, list[float]] = {d: [] for d in dimensions}
    for (what, it, key), v in zip(calls, verdicts):
        if what == "qa":
            if v.yes is None:
                unparseable.append(it.qid)
            else:
                yes[it.qid] = v.yes
                scores.append(v.score)
        elif v.score is None:
            unparseable.append(f"pair {key}:{CONSISTENCY}" if what == CONSISTENCY else f"{it.qid}:{what}")
        else:
            dims[what].append(v.score)
    if CONSISTENCY in dimensions:
        extra = {"consistency_pairs": len(dims[CONSISTENCY]), "consistency_pairs_unanswered": unanswered}
        if not pairs and not unanswered:
            extra["consistency_note"] = ("no paired questions: consistency needs a benchmark whose items come in "
                                         "pairs, e.g. reader videochatgpt on consistency_qa.json")
    u = judge.usage
    out = {"accuracy": sum(yes.values()) / len(yes) if yes else None,
           "score": sum(scores) / len(scores) if scores else None,
           "n": len(yes), "unparseable": len(unparseable), "unparseable_ids": unparseable,
           "judge": {**judge.cfg.record(), "served_model": sorted(judge.client.served_models)},
           "judge_usage": {"calls": u.calls, "cached": u.cached_calls, "retries": u.retries,
                           "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                           "cost_usd": round(judge.cost_usd(), 6)},
           "correct": yes, **extra}
    for d, v in dims.items():
        if v or d != CONSISTENCY:
            out[f"dim_{d}"] = sum(v) / len(v) if v else None
    return out
