"""An LLM behind any OpenAI-compatible endpoint: caching, rate limit, retries, JSON replies, cost.

One `ChatClient` serves every caller: the curation's stages (fusion, instruction generation,
verification) and the evaluation judge. Each call:
1. looks up the reply in the given cache folder (`disk_cache.JsonDir`; key: model + prompt version
   + the exact messages and sampling settings), so a rerun pays only for what is new;
2. waits for the rate limiter, then sends the request (the `openai` client, its own retries off);
3. retries 429, 5xx, timeouts and connection errors with exponential back-off and jitter,
   honouring a `Retry-After` header;
4. with `expect_json`, parses the reply robustly (code fences, prose around the object, trailing
   commas) and re-asks up to `json_retries` times when it still is not the JSON asked for;
5. adds the reply's token usage to `Usage` (thread-safe), which prices it.

The API key is read from the environment variable named in the config and never logged or
written; the cache stores only messages, replies and usage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from nemo_avllm.runtime.disk_cache import JsonDir, digest

log = logging.getLogger(__name__)

OPENAI_DEFAULT_URL = "https://api.openai.com/v1"


class LLMError(RuntimeError):
    """A call that failed after all retries (or a reply that never became the JSON asked for)."""


class UnusableReply(LLMError):
    """A reply that `chat(parse=...)` could not read after every re-ask (nothing was cached)."""


def map_concurrent(fn, items, max_concurrency: int = 1) -> list:
    """`[fn(x) for x in items]` on up to `max_concurrency` threads, results in order. An error
    cancels the calls not started yet and is raised once the running ones end (an outage fails
    once, not once per item)."""
    items = list(items)
    n = max(1, int(max_concurrency or 1))
    if n == 1 or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=min(n, len(items)))
    try:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# JSON replies
# --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _balanced(text: str, start: int) -> str | None:
    """The JSON object/array that opens at `text[start]`, found by bracket matching outside strings."""
    open_c = text[start]
    close_c = "}" if open_c == "{" else "]"
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def parse_json_reply(text: str):
    """The first JSON object (or array) in an LLM reply, tolerating code fences, prose before and
    after, and trailing commas. Raises ValueError (with the start of the reply) when there is none."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        for i, c in enumerate(cand):
            if c not in "{[":
                continue
            block = _balanced(cand, i)
            if block is None:
                continue
            for attempt in (block, _TRAILING_COMMA.sub(r"\1", block)):
                try:
                    return json.loads(attempt)
                except json.JSONDecodeError:
                    pass
    raise ValueError(f"no JSON object in the reply: {text[:200]!r}")


# --------------------------------------------------------------------------------------------
# Accounting and rate limit
# --------------------------------------------------------------------------------------------


@dataclass
class Usage:
    """Tokens and calls of one run; cached replies count their tokens as `cached_*` (not paid)."""

    calls: int = 0
    cached_calls: int = 0
    retries: int = 0
    json_retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    by_stage: dict = field(default_factory=dict)  # stage -> {"calls", "prompt_tokens", "completion_tokens"}
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stage: str, prompt: int, completion: int, cached: bool) -> None:
        with self._lock:
            if cached:
                self.cached_calls += 1
                self.cached_prompt_tokens += prompt
                self.cached_completion_tokens += completion
            else:
                self.calls += 1
                self.prompt_tokens += prompt
                self.completion_tokens += completion
            s = self.by_stage.setdefault(stage, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
            s["calls"] += 1
            s["prompt_tokens"] += prompt
            s["completion_tokens"] += completion

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def cost(self, price_in: float, price_out: float, include_cached: bool = False) -> float:
        """USD at `price_in` / `price_out` per million tokens (paid calls; all calls with `include_cached`)."""
        p, c = self.prompt_tokens, self.completion_tokens
        if include_cached:
            p, c = p + self.cached_prompt_tokens, c + self.cached_completion_tokens
        return (p * price_in + c * price_out) / 1e6

    def to_dict(self) -> dict:
        with self._lock:
            d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
            d["by_stage"] = {k: dict(v) for k, v in self.by_stage.items()}
        return d


class RateLimiter:
    """At most `per_minute` request starts per minute, spaced evenly (0: unlimited)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


def api_key(cfg) -> str:
    """The key from `cfg.api_key_env`. Local servers (vLLM, NIM) accept any key; OpenAI's does not."""
    name = cfg.get("api_key_env") or "OPENAI_API_KEY"
    key = os.environ.get(name)
    if key:
        return key
    if str(cfg.base_url).rstrip("/") == OPENAI_DEFAULT_URL:
        raise LLMError(f"llm.base_url is OpenAI's API but the environment variable {name} is not set; "
                       f"export {name}=<your key>, or point llm.base_url at a local OpenAI-compatible server")
    return "EMPTY"


class ChatClient:
    """Chat completions with cache, rate limit, concurrency cap, retries and usage (see module doc)."""

    def __init__(self, cfg, prompt_version: str, usage: Usage | None = None):
        """`cfg`: a config node or dataclass with base_url, model, api_key_env, temperature and the
        optional max_tokens, timeout_s, max_concurrency, requests_per_minute, max_retries,
        backoff_s, backoff_max_s, json_retries (conf/curate.yaml `llm`, conf/evaluate.yaml `judge.client`)."""
        import openai
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(asdict(cfg) if is_dataclass(cfg) else dict(cfg))
        self.cfg = cfg
        self.prompt_version = prompt_version
        self.usage = usage or Usage()
        self.limiter = RateLimiter(float(cfg.get("requests_per_minute") or 0))
        self._slots = threading.Semaphore(max(1, int(cfg.get("max_concurrency") or 1)))
        self.served_models: set[str] = set()  # the model ids the server says answered (recorded with results)
        self._openai = openai
        self.client = openai.OpenAI(base_url=str(cfg.base_url), api_key=api_key(cfg), max_retries=0,
                                    timeout=float(cfg.get("timeout_s") or 120))

    def _retryable(self, e: Exception) -> bool:
        o = self._openai
        if isinstance(e, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError)):
            return True
        return isinstance(e, o.APIStatusError) and (e.status_code >= 500 or e.status_code in (408, 409, 429))

    def _backoff(self, attempt: int, e: Exception) -> float:
        retry_after = None
        resp = getattr(e, "response", None)
        if resp is not None:
            try:
                retry_after = float(resp.headers.get("retry-after"))
            except (TypeError, ValueError):
                retry_after = None
        base = float(self.cfg.get("backoff_s", 1.0)) * 2 ** attempt * (0.5 + random.random())
        wait = retry_after if retry_after is not None else base
        return min(wait, float(self.cfg.get("backoff_max_s", 60.0)))

    def _max_tokens(self) -> dict:
        """`max_tokens` when configured (the judge protocol leaves it to the server)."""
        n = self.cfg.get("max_tokens")
        return {"max_tokens": int(n)} if n else {}

    def _send(self, messages: list[dict]) -> tuple[str, int, int]:
        """One completion with retries -> (text, prompt tokens, completion tokens)."""
        max_retries = int(self.cfg.get("max_retries", 5))
        for attempt in range(max_retries + 1):
            self.limiter.wait()
            try:
                with self._slots:
                    r = self.client.chat.completions.create(
                        model=str(self.cfg.model), messages=messages, temperature=float(self.cfg.temperature),
                        **self._max_tokens())
            except Exception as e:  # noqa: BLE001 (classified below)
                if not self._retryable(e) or attempt == max_retries:
                    raise LLMError(f"{self.cfg.base_url} ({self.cfg.model}) failed after {attempt + 1} attempts: "
                                   f"{type(e).__name__}: {e}") from e
                wait = self._backoff(attempt, e)
                log.warning("LLM call failed (%s); retry %d/%d in %.1f s", type(e).__name__, attempt + 1, max_retries, wait)
                self.usage.count("retries")
                time.sleep(wait)
                continue
            if not r.choices:
                raise LLMError(f"{self.cfg.base_url} ({self.cfg.model}) returned no choices")
            if getattr(r, "model", None):
                self.served_models.add(str(r.model))
            text = r.choices[0].message.content or ""
            u = r.usage
            return text, int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)
        raise AssertionError("unreachable")

    def _cache_name(self, stage: str, messages: list[dict], expect_json: bool, variant: int) -> str:
        key = digest({"model": str(self.cfg.model), "prompt_version": self.prompt_version, "messages": messages,
                      "temperature": float(self.cfg.temperature), "max_tokens": self._max_tokens().get("max_tokens"),
                      "json": expect_json, "variant": variant})
        return f"llm-{stage}-{key}"

    def chat(self, stage: str, messages: list[dict], cache: JsonDir | None = None, expect_json: bool = False,
             validate=None, variant: int = 0, parse=None):
        """The reply text (or parsed JSON with `expect_json`), from the cache when it has it.

        `validate(parsed)` may raise ValueError for JSON of the wrong shape: that re-asks too.
        `variant` > 0 asks the same messages again for another sample (its own cache entry).
        `parse(text)` (instead of `expect_json`) reads a reply in another format: a ValueError re-asks
        up to `json_retries` times, then raises `UnusableReply`; only a reply it reads is cached, and
        a cached reply it cannot read is asked again."""
        if parse is not None:
            return self._chat_parsed(stage, messages, cache, parse, variant)
        name = self._cache_name(stage, messages, expect_json, variant)
        hit = cache.get(name) if cache is not None else None
        if hit is not None:
            self.usage.add(stage, hit["prompt_tokens"], hit["completion_tokens"], cached=True)
            return hit["parsed"] if expect_json else hit["text"].strip()
        if not expect_json:
            text, _, p_all, c_all = self._ask(stage, messages, None, 1)
            parsed = None
        else:
            def read_json(reply: str):
                value = parse_json_reply(reply)
                if validate is not None:
                    validate(value)
                return value

            tries = int(self.cfg.get("json_retries", 2)) + 1
            try:
                text, parsed, p_all, c_all = self._ask(stage, messages, read_json, tries)
            except UnusableReply as e:
                raise LLMError(f"{stage}: the reply is not the JSON asked for after {tries} tries ({e.__cause__})") from e.__cause__
        if cache is not None:
            self._put(cache, name, stage, messages, text, parsed, p_all, c_all)
        return parsed if expect_json else text.strip()

    def _ask(self, stage: str, messages: list[dict], parse, tries: int):
        """Send `messages`; with `parse`, re-ask (showing the model its reply) until `parse(text)`
        reads it, `tries` times at most, then raise `UnusableReply`. Returns (text, parsed,
        prompt tokens, completion tokens of every attempt: what a rerun would have paid)."""
        ask, p_all, c_all = list(messages), 0, 0
        for attempt in range(tries):
            try:
                text, p, c = self._send(ask)
            except LLMError:
                self.usage.count("failures")
                raise
            self.usage.add(stage, p, c, cached=False)
            p_all, c_all = p_all + p, c_all + c
            if parse is None:
                return text, None, p_all, c_all
            try:
                return text, parse(text), p_all, c_all
            except ValueError as e:
                if attempt == tries - 1:
                    self.usage.count("failures")
                    raise UnusableReply(f"{stage}: no usable reply after {tries} tries ({e}); last: {text[:200]!r}") from e
                self.usage.count("json_retries")
                ask = list(messages) + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"That reply could not be used ({e}). Reply again in the format asked for only."},
                ]
        raise AssertionError("unreachable")

    def _put(self, cache: JsonDir, name: str, stage: str, messages: list[dict], text: str, parsed, p_all: int,
             c_all: int) -> None:
        cache.put(name, {"stage": stage, "model": str(self.cfg.model), "prompt_version": self.prompt_version,
                         "messages": messages, "text": text, "parsed": parsed, "prompt_tokens": p_all,
                         "completion_tokens": c_all})

    def _chat_parsed(self, stage: str, messages: list[dict], cache: JsonDir | None, parse, variant: int):
        name = self._cache_name(stage, messages, False, variant)
        hit = cache.get(name) if cache is not None else None
        if hit is not None:
            try:
                value = parse(hit["text"])
                self.usage.add(stage, hit["prompt_tokens"], hit["completion_tokens"], cached=True)
                return value
            except ValueError:
                pass  # an unreadable reply cached by an older version: ask again
        text, value, p_all, c_all = self._ask(stage, messages, parse, int(self.cfg.get("json_retries", 2)) + 1)
        if cache is not None:
            self._put(cache, name, stage, messages, text, None, p_all, c_all)
        return value
