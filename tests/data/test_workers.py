"""Worker processes of the data layer: a SIGTERM that reaches a worker before it has set up its
own signal handling is kept, not lost (`Pool.terminate` on a worker still starting hung)."""

from __future__ import annotations

import signal
import time

from nemo_avllm.data.workers import pool_worker_start, worker_context


def _start_late_then_take_sigterm(delay: float) -> None:
    """A pool worker whose start is slow (a loaded machine): SIGTERM arrives before its initializer."""
    time.sleep(delay)
    pool_worker_start()
    time.sleep(60)


def test_sigterm_before_a_worker_started_still_stops_it():
    p = worker_context().Process(target=_start_late_then_take_sigterm, args=(2.0,))
    p.start()
    time.sleep(0.5)
    p.terminate()  # what Pool.terminate sends each worker
    p.join(30)
    try:
        assert p.exitcode == -signal.SIGTERM, f"the worker is still running (exit code {p.exitcode})"
    finally:
        if p.exitcode is None:
            p.kill()
            p.join()
