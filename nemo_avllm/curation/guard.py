"""What keeps a curation run from going quietly wrong at scale: the endpoint and key are probed
before any captioning, a run of connection / authentication failures stops the run instead of
marking every video bad, SIGINT / SIGTERM cancel the queued requests (the cache stays consistent:
each reply is written whole), every task takes its own GPU, and secrets never reach a written file.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """SIGINT / SIGTERM during a run: queued work is cancelled, the run ends (not an Exception, so
    no per-job handler swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LLMUnavailable(UserError):
    """The endpoint cannot be reached or refuses the key: no point in sending the rest."""


class SignalsInterrupt:
    """While active (main thread only), SIGINT and SIGTERM raise `Interrupted` in the main thread."""

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum, _frame):
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"(?i)(bearer\s+)[^\s\"',}]+|\bsk-[A-Za-z0-9_\-]{8,}")


class Masker:
    """Replaces the API key (and anything shaped like a bearer token or `sk-...` key) by `***`."""

    def __init__(self, *secrets: str | None):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4 and s != "EMPTY"}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return _TOKEN.sub(lambda m: (m.group(1) or "") + "***", text)


# --------------------------------------------------------------------------------------------
# Endpoint: probe and circuit breaker
# --------------------------------------------------------------------------------------------


def failure_kind(e: BaseException) -> str | None:
    """"connection" or "auth" for an error (or its cause) that says the endpoint itself is unusable."""
    import openai

    while e is not None:
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return "auth"
        if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):  # timeout subclasses connection
            return "connection"
        e = e.__cause__
    return None


def _what_to_do(kind: str, cfg) -> str:
    if kind == "auth":
        return (f"the server at llm.base_url={cfg.base_url} refused the key in ${cfg.get('api_key_env') or 'OPENAI_API_KEY'}: "
                f"export the right key")
    return f"cannot reach llm.base_url={cfg.base_url}: start the server or fix the URL"


def probe(llm, mask: Masker, attempts: int = 3) -> None:
    """One 1-token chat completion before any work: a dead URL, a refused key or an unknown model
    stop the run here (LLMUnavailable / UserError) instead of after hours of captioning. Transient
    errors (429, 5xx) are retried; other answers (e.g. a 400 for the 1-token limit) mean the server
    is there and took the key."""
    import openai

    cfg = llm.cfg
    for attempt in range(attempts):
        try:
            llm.client.chat.completions.create(model=str(cfg.model), messages=[{"role": "user", "content": "Reply OK."}],
                                               max_tokens=1, temperature=0.0)
            return
        except Exception as e:  # noqa: BLE001 (classified)
            kind = failure_kind(e)
            if kind == "auth":
                raise LLMUnavailable(f"{_what_to_do(kind, cfg)} ({mask(_short(e))})") from None
            if isinstance(e, openai.NotFoundError):
                raise UserError(f"llm.base_url={cfg.base_url} / llm.model={cfg.model}: not found ({mask(_short(e))}); "
                                f"check the URL (it ends in /v1) and the model name") from None
            transient = kind == "connection" or (isinstance(e, openai.APIStatusError) and
                                                 (e.status_code >= 500 or e.status_code in (408, 409, 429)))
            if not transient:
                log.warning("curate: the endpoint probe got %s; going on", mask(_short(e)))
                return
            if attempt == attempts - 1:
                if kind == "connection":
                    raise LLMUnavailable(f"{_what_to_do(kind, cfg)} ({mask(_short(e))})") from None
                log.warning("curate: the endpoint probe got %s after %d tries; going on", mask(_short(e)), attempts)
                return
            llm.usage.count("retries")
            time.sleep(min(float(cfg.get("backoff_s", 1.0)) * 2 ** attempt, 10.0))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


class Breaker:
    """Stops the run after `limit` calls in a row failed for connection / authentication reasons
    (a dead or wrong endpoint), so that good videos are not marked bad one by one."""

    def __init__(self, cfg, limit: int, mask: Masker):
        self.cfg, self.limit, self.mask = cfg, max(1, int(limit)), mask
        self.run, self.kind, self.last = 0, None, ""
        self._lock = threading.Lock()

    def record(self, error: BaseException | None) -> None:
        """After each job: raises LLMUnavailable when the breaker trips."""
        kind = failure_kind(error) if error is not None else None
        with self._lock:
            if kind is None:
                self.run = 0
                return
            self.run, self.kind, self.last = self.run + 1, kind, self.mask(_short(error))
            tripped = self.run >= self.limit
        if tripped:
            raise LLMUnavailable(f"stopped after {self.run} LLM calls in a row failed ({self.kind}): "
                                 f"{_what_to_do(self.kind, self.cfg)}; no video was marked bad for it, and rerunning "
                                 f"the same command resumes from the cache (llm.max_consecutive_failures={self.limit}; "
                                 f"last: {self.last})")

    @staticmethod
    def endpoint_failure(error: BaseException) -> bool:
        return failure_kind(error) is not None


# --------------------------------------------------------------------------------------------
# One GPU per task
# --------------------------------------------------------------------------------------------


def local_gpu(environ=None, count: int | None = None) -> int:
    """This task's GPU index: LOCAL_RANK (torchrun) or SLURM_LOCALID (srun), 0 when each task sees
    one GPU (srun --gpus-per-task=1); refused when a task's rank has no GPU of its own."""
    env = os.environ if environ is None else environ
    if count is None:
        import torch

        count = torch.cuda.device_count()
    rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)) or 0)
    if count <= 1:
        return 0
    if rank >= count:
        raise UserError(f"this task's local rank {rank} (LOCAL_RANK / SLURM_LOCALID) has no GPU of its own ({count} visible): "
                        f"run one task per GPU (srun --ntasks-per-node=GPUs --gpus-per-node=GPUs)")
    return rank
