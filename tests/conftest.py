"""Shared fixtures: tiny configs of the real architectures, a tokenizer trained offline, and a
torchrun launcher for multi-process (gloo) tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# Words the tiny tokenizer must cover: the template, the demo's vocabulary, some free text.
TOKENIZER_TEXTS = [
    "A chat between a curious human and a video assistant. Human: What colour is the square? "
    "Assistant: The square is red and it moves to the left.",
    "Human: Describe the sound. Assistant: A high tone plays while a dog barks loudly.",
    "Human: Is the sound synchronous with the motion? Assistant: Yes, the beeps match the bounces.",
] * 20 + [f"the {c} {s} moves {d} while a {p} tone plays {i} times" for i, (c, s, d, p) in enumerate(
    [(c, s, d, p) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")
     for d in ("left", "right", "up", "down") for p in ("low", "high")])]


def torchrun_cmd(nproc: int) -> list[str]:
    """torchrun on local gloo processes. `--standalone` lets the rendezvous store bind a free port
    itself: picking a "free" port first and passing it races with other processes on the machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from nemo_avllm.data.tokenizer import train_sentencepiece

    return train_sentencepiece(TOKENIZER_TEXTS, tmp_path_factory.mktemp("tokenizer"), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from nemo_avllm.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def dist1():
    """Single-process torch.distributed + megatron parallel state (TP=1, PP=1) on gloo."""
    from nemo_avllm.runtime import distributed

    distributed.initialize(1, 1, seed=1234)
    yield
    distributed.destroy()


@pytest.fixture
def tiny_cfg():
    from nemo_avllm import config

    return config.load_model("tiny")


def torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` local gloo processes; fail the test with the output on error."""
    # the repo first; keep a caller's PYTHONPATH (bench/gpu_check.sh puts carried wheels there)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [*torchrun_cmd(nproc), str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
