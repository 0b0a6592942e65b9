"""Curation that stops instead of going quietly wrong: the endpoint and key are probed before any
captioning, a run of dropped connections stops the run without marking videos bad, Ctrl-C cancels
the queued requests, a key echoed in an error body never reaches a file, captioner folders with
missing weights are refused, and each task takes its own GPU. Against a real HTTP server on
127.0.0.1 that drops connections or answers 401."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nemo_avllm.curation import guard, pipeline
from tests.conftest import REPO
from tests.curation.helpers import ChatServer, answer, tiny_clap
from tests.curation.test_curate import _cfg, clips, models  # noqa: F401 (module fixtures)

KEY = "sk-test-abcdefghijklmnop"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guard_cache")


def _ok(body, n):
    return 200, answer(body["messages"])[1]


def test_a_refused_key_or_a_dead_url_stops_before_any_captioning(tmp_path, clips, models, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cache = tmp_path / "cache"
    with ChatServer(respond=lambda body, n: (401, f"Incorrect API key provided: {KEY}")) as server:
        with pytest.raises(guard.LLMUnavailable, match=r"refused the key in \$OPENAI_API_KEY") as e:
            pipeline.curate(_cfg(tmp_path, clips, models, server.url, cache))
        assert KEY not in str(e.value) and "***" in str(e.value)
        assert len(server.requests) == 1
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(guard.LLMUnavailable, match=r"cannot reach llm.base_url=http://127.0.0.1:\d+/v1"):
        pipeline.curate(_cfg(tmp_path, clips, models, dead, cache))
    assert not cache.exists() or not any(cache.rglob("*.json"))  # nothing was captioned


def test_dropped_connections_stop_the_run_without_marking_videos_bad(tmp_path, clips, models, cache_dir, monkeypatch):  # noqa: F811
    """After the probe, the server drops every connection: two failures in a row stop the run
    (one line naming the URL), no good video lands in bad_videos.jsonl. Then a server that echoes
    the key in its error bodies: the videos' failures are reported, the key is masked."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    drop = {"llm.max_retries": 0, "llm.max_consecutive_failures": 2, "llm.max_concurrency": 1}
    with ChatServer(respond=lambda body, n: _ok(body, n) if n == 0 else (0, "")) as server:
        cfg = _cfg(tmp_path, clips, models, server.url, cache_dir, **drop)
        with pytest.raises(guard.LLMUnavailable, match=r"stopped after 2 LLM calls in a row failed \(connection\)"):
            pipeline.curate(cfg)
        statuses = [r["status"] for r in server.requests]  # the probe, two failed fusion calls, stop
        assert statuses[:3] == [200, 0, 0] and len(statuses) <= 4, statuses  # (+ at most the one in flight)
    assert not (tmp_path / "out" / "bad_videos.jsonl").exists()

    with ChatServer(respond=lambda body, n: _ok(body, n) if n == 0 else (400, f"invalid request (key {KEY})")) as server:
        report = pipeline.curate(_cfg(tmp_path, clips, models, server.url, cache_dir, **drop))
    assert report["videos"]["bad"] == 4 and report["videos"]["fused"] == 0  # broken.mp4 + three 400s
    for name in ("bad_videos.jsonl", "report.json"):
        text = (tmp_path / "out" / name).read_text()
        assert KEY not in text and "key ***" in text, name


def test_ctrl_c_cancels_the_queued_requests_and_leaves_the_cache_whole(tmp_path, clips, models, cache_dir):  # noqa: F811
    """`avllm curate` (captions cached by the test above) with ~30 requests to send, 2 at a time,
    each answered in 0.3 s; SIGINT after the 8th: at most the 2 in flight follow, exit 130 with one
    line, no traceback, every cache file whole."""
    seen = []

    def slow(body, n):
        seen.append(time.monotonic())
        time.sleep(0.3)
        return _ok(body, n)

    with ChatServer(respond=slow) as server:
        args = ["curate", f"input={clips}", f"out_dir={tmp_path / 'out'}", "progress=false", f"cache_dir={cache_dir}",
                "captions.num_frames=4", "captions.num_segments=2", "captions.batch_size=4", "captions.device=cpu",
                f"captions.frame.model={models['blip']}", "captions.frame.max_new_tokens=6",
                f"captions.audio.model={models['clap']}", f"llm.base_url={server.url}", "llm.model=test-llm",
                "llm.max_concurrency=2", "llm.requests_per_minute=0", "instructions.per_video=8", "verify.judge.enabled=false"]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OPENAI_API_KEY=KEY)
        proc = subprocess.Popen([sys.executable, "-m", "nemo_avllm.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while len(seen) < 8:
            assert proc.poll() is None and time.monotonic() - t0 < 300, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        at_signal = len(seen)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT" in err and "Traceback" not in err, err[-3000:]
    assert len(seen) <= at_signal + 2, (at_signal, len(seen))  # only what was in flight
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())


def test_a_clap_folder_without_its_text_tower_is_refused(tmp_path):
    """Its label embeddings would be random: refused unless captions.allow_incomplete_weights=true."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from nemo_avllm import config
    from nemo_avllm.curation.captions import AudioTagger
    from nemo_avllm.errors import UserError

    folder = tiny_clap(tmp_path / "clap")
    weights = folder / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("text_model.")}, weights,
              metadata={"format": "pt"})
    audio = OmegaConf.merge(config.load("curate", ["input=x", "out_dir=y"]).captions.audio, {"model": str(folder)})
    with pytest.raises(UserError, match=rf"captions.audio.model={folder}: \d+ weights are not in the folder .*text_model.*"
                                        r"allow_incomplete_weights=true"):
        AudioTagger(audio, "cpu", 4, 2)
    assert AudioTagger(audio, "cpu", 4, 2, allow=True).text.shape[0] == 527


@pytest.mark.parametrize("env,count,gpu", [
    ({"SLURM_LOCALID": "3"}, 8, 3),                    # srun, 8 tasks on a node that each see 8 GPUs
    ({"LOCAL_RANK": "1", "SLURM_LOCALID": "5"}, 8, 1),  # torchrun inside an allocation
    ({"SLURM_LOCALID": "3"}, 1, 0),                    # srun --gpus-per-task=1: each task sees its own
    ({}, 8, 0),
])
def test_each_task_takes_its_own_gpu(env, count, gpu):
    assert guard.local_gpu(env, count) == gpu


def test_more_tasks_than_gpus_is_refused():
    with pytest.raises(ValueError, match="local rank 9 .* has no GPU of its own"):
        guard.local_gpu({"SLURM_LOCALID": "9"}, 8)
