"""`avllm curate` end to end: ffmpeg clips -> tiny BLIP / CLAP captions -> a real local
OpenAI-compatible server (failures included) -> real MiniLM verification -> manifests that the
training's validator, `prepare` and one `avllm train` step accept; then a rerun served entirely
from the cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nemo_avllm import config
from nemo_avllm.curation import pipeline
from tests.conftest import REPO
from tests.curation.helpers import OFF_TOPIC, ChatServer, tiny_blip, tiny_clap, tiny_whisper
from tests.media_factory import make_clip, tone


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"blip": tiny_blip(root / "blip"), "clap": tiny_clap(root / "clap")}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three clips (two with audio, one silent) and one corrupt file, listed in a manifest."""
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    make_clip(d / "a.mp4", num_frames=10, fps=10, audio=tone(1.0, 48000, 440.0))
    make_clip(d / "b.mp4", frames=rng.integers(0, 255, (12, 48, 64, 3), dtype=np.uint8), fps=12,
              audio=tone(1.0, 48000, 2000.0, gains=(0.3, 0.6)))
    make_clip(d / "c.mp4", num_frames=8, fps=8)
    (d / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    manifest = d / "videos.jsonl"
    manifest.write_text("".join(json.dumps({"video": n}) + "\n" for n in ("a.mp4", "b.mp4", "c.mp4", "broken.mp4")))
    return manifest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared by the tests of this module: the dry run reuses the end-to-end run's captions."""
    return tmp_path_factory.mktemp("cache")


def _cfg(tmp_path, clips, models, url, cache_dir, **over):
    overrides = [
        f"input={clips}", f"out_dir={tmp_path / 'out'}", "progress=false", f"cache_dir={cache_dir}",
        "captions.num_frames=4", "captions.num_segments=2", "captions.batch_size=4", "captions.device=cpu",
        f"captions.frame.model={models['blip']}", "captions.frame.max_new_tokens=6",
        f"captions.audio.model={models['clap']}",
        f"llm.base_url={url}", "llm.model=test-llm", "llm.timeout_s=2", "llm.backoff_s=0.01",
        "llm.max_concurrency=3", "llm.requests_per_minute=0",
        # every cell of Table 1 at least once, one cell asked twice from the same video (a duplicate)
        "+instructions.counts={description: {V: 4, A: 1, AV: 1}, conversation: {V: 1, A: 1, AV: 1}, "
        "reasoning: {V: 1, A: 1, AV: 1}}",
    ]
    return config.load("curate", overrides + [f"{k}={v}" for k, v in over.items()])


def _train_one_step(tmp_path, tokenizer_dir, manifests, index) -> list[dict]:
    """`avllm train` (tiny model, real encoders on the clips) for one step on the manifests."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    args = ["train", "model=tiny", "model.allow_random_init=true", f"model.tokenizer={tokenizer_dir}",
            f"model.data.train_manifest=[{','.join(map(str, manifests))}]",
            f"model.data.index={index}", "model.data.num_workers=0", "trainer.devices=1", "trainer.max_steps=1",
            "model.optim.warmup_ratio=0", "model.micro_batch_size=1", "model.global_batch_size=3", "model.seq_length=128",
            f"exp_manager.exp_dir={tmp_path / 'runs'}", "exp_manager.create_tensorboard_logger=false",
            "exp_manager.create_checkpoint_callback=false", "trainer.enable_progress_bar=false"]
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from nemo_avllm.training.callbacks import read_metrics

    return read_metrics(next((tmp_path / "runs").glob("*")))


def test_curate_end_to_end_then_resume(tmp_path, clips, models, monkeypatch, tokenizer_dir, cache_dir):
    from nemo_avllm.data.manifest_checks import validate_manifest
    from nemo_avllm.data.prepare import prepare

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-secret")
    with ChatServer(slow_s=3.0) as server:
        cfg = _cfg(tmp_path, clips, models, server.url, cache_dir)
        report = pipeline.curate(cfg)
        first_requests = len(server.requests)

        # -- operations: the bad file is reported, failures were retried, nothing stopped the run
        assert report["videos"] == {"input": 4, "captioned": 3, "fused": 3, "bad": 1}
        assert report["bad_videos"][0]["path"].endswith("broken.mp4")
        statuses = [r["status"] for r in server.requests]
        assert statuses[:2] == [500, 429] and report["usage"]["retries"] >= 3  # 500, 429, one timeout
        assert any(r["slow"] for r in server.requests) and any(r["truncated"] for r in server.requests)
        assert report["usage"]["json_retries"] == 1 and report["usage"]["failures"] == 0
        assert report["generation"] == {"requested": 12, "generated": 12, "failed": 0, "failures": []}
        assert report["usage"]["prompt_tokens"] > 0 and report["cost_usd"] > 0

        # -- captions carry time spans; fusion made all three captions where there is audio
        caps = {json.loads(line)["video"].rsplit("/", 1)[1]: json.loads(line)
                for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()}
        a = caps["a.mp4"]
        assert len(a["frames"]) == 4 and len(a["audio"]) == 2 and a["has_audio"]
        assert [s["start"] for s in a["audio"]] == [0.0, 0.5] and a["audio"][1]["end"] == pytest.approx(1.0, abs=0.03)
        assert a["frames"][0]["start"] == 0.0 and a["frames"][-1]["end"] == pytest.approx(a["duration"], abs=0.02)
        assert all(len(s["tags"]) >= 1 for s in a["audio"])
        assert caps["c.mp4"]["audio"] == [] and caps["c.mp4"]["fused"]["audio"] is None
        assert a["fused"]["video"].startswith("The video shows") and "Meanwhile" in a["fused"]["audio_visual"]

        # -- verification: each filter dropped exactly what the server made bad
        f = report["filters"]
        assert f["relevance"]["dropped"] == 1 and OFF_TOPIC[:30] in f["relevance"]["examples"][0]["text"]
        assert f["near_duplicate"]["dropped"] >= 1  # description/V asked 4 times from 3 videos
        assert f["judge"]["dropped"] == 1 and "fluency=2" in f["judge"]["examples"][0]["why"]
        assert "reasoning/A" not in report["kept"] and "conversation/V" not in report["kept"]

        # -- manifests: right token per cell, accepted as they are by validation and by prepare
        out = tmp_path / "out"
        s1, rep1 = validate_manifest(out / pipeline.STAGE1_NAME, strict=True)
        s2, rep2 = validate_manifest(out / pipeline.STAGE2_NAME, strict=True)
        assert len(s1) == report["manifests"]["stage1"]["lines"] > 0 and len(s2) == report["manifests"]["stage2"]["lines"] > 0
        want = {"V": "<VIS>", "A": "<AUD>", "AV": "<AUD_VIS>"}
        for s in s1 + s2:
            cell = s.record["curation"]
            assert s.conversations[0]["value"].startswith(want[cell["modality"]] + " ")
            assert s.modality == cell["modality"] and not s.video.endswith("c.mp4") or cell["modality"] == "V"
        assert {s.record["curation"]["type"] for s in s1} == {"description"}
        assert {s.record["curation"]["type"] for s in s2} <= {"conversation", "reasoning"}
        assert any(len(s.conversations) == 6 for s in s2)  # a 3-turn conversation
        prep = prepare([out / pipeline.STAGE1_NAME, out / pipeline.STAGE2_NAME], tmp_path / "prep", num_workers=1,
                       progress=False)
        assert prep.failed == 0 and prep.indexed == 3
        _, rep = validate_manifest([out / pipeline.STAGE1_NAME, out / pipeline.STAGE2_NAME], index=tmp_path / "prep")
        assert rep.ok and rep.kept == len(s1) + len(s2)
        metrics = _train_one_step(tmp_path, tokenizer_dir, [out / pipeline.STAGE1_NAME, out / pipeline.STAGE2_NAME],
                                  tmp_path / "prep")
        assert metrics and metrics[-1]["step"] == 1 and math.isfinite(metrics[-1]["reduced_train_loss"])

        # -- the key never reaches disk
        for p in [*out.rglob("*"), *cache_dir.rglob("*")]:
            if p.is_file():
                assert b"sk-test-not-a-secret" not in p.read_bytes(), p

        # -- resume: the same command again is served from the cache, same manifests
        before = {n: (out / n).read_text() for n in (pipeline.STAGE1_NAME, pipeline.STAGE2_NAME)}
        again = pipeline.curate(cfg)
        assert len(server.requests) == first_requests + 1 and server.requests[-1]["kind"] == "other"  # the probe only
        assert again["usage"]["calls"] == 0 and again["usage"]["cached_calls"] == report["usage"]["calls"] - \
            report["usage"]["json_retries"]
        assert {n: (out / n).read_text() for n in before} == before
        assert again["cost_per_1k_videos_usd"] == report["cost_per_1k_videos_usd"] > 0


def test_dry_run_from_the_command_line_prints_prompts_and_estimate(tmp_path, clips, models, cache_dir):
    """`avllm curate ... dry_run=true`: captions, then prompts and a cost estimate, no LLM calls
    (nothing listens at the configured URL)."""
    args = ["curate", f"input={clips}", f"out_dir={tmp_path / 'out'}", "dry_run=true", "progress=false", f"cache_dir={cache_dir}",
            "captions.num_frames=4", "captions.num_segments=2", "captions.device=cpu",
            f"captions.frame.model={models['blip']}", "captions.frame.max_new_tokens=6",
            f"captions.audio.model={models['clap']}", "llm.base_url=http://127.0.0.1:9/v1", "instructions.per_video=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("OPENAI_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Below are captions of video frames" in out and "ROLE:" in out and "CONTEXT (" in out
    assert "3 videos, 12 items requested" in out and "per 1k videos" in out
    assert "broken.mp4" in proc.stdout + proc.stderr  # the bad file is reported (logged: stdout under Hydra)


def test_audio_captioning_model_instead_of_tags(tmp_path, clips, models):
    """`captions.audio.method=seq2seq`: a speech-to-text model captions each segment, fed at its
    own sampling rate (16 kHz here, not CLAP's 48 kHz)."""
    from nemo_avllm.curation.captions import Captioner, caption_videos
    from nemo_avllm.data.manifest import read_inputs

    cfg = _cfg(tmp_path, clips, models, "http://127.0.0.1:9/v1", tmp_path / "cache", **{
        "captions.audio.method": "seq2seq", "captions.audio.model": tiny_whisper(tmp_path / "whisper"),
        "captions.audio.max_new_tokens": 4})
    a = [it for it in read_inputs(str(clips)) if it.video.endswith("a.mp4")]
    assert Captioner(cfg.captions).audio.sample_rate == 16000
    bad: list = []
    caps = caption_videos(a, cfg.captions, tmp_path / "cache", bad, progress=False)
    vc = caps[a[0].id]
    assert not bad and vc.has_audio and len(vc.audio) == 2
    assert [s["start"] for s in vc.audio] == [0.0, pytest.approx(0.5, abs=0.02)]
    assert vc.audio[1]["end"] == pytest.approx(1.0, abs=0.03)
    assert all(isinstance(s["text"], str) and "tags" not in s for s in vc.audio)
