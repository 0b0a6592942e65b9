"""`avllm evaluate` refuses bad input before any model is loaded (issue 23, points 2, 3 and 8):
no media under the video root, a judge that cannot answer; and `predictions=FILE` scores without a
model, writing the judge-free metrics even when the judge fails. The checkpoint here is a folder
that only looks like one (metadata.json): loading it would fail, so reaching the model is a failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from nemo_avllm import cli
from nemo_avllm.evaluation import benchmarks as B
from tests.evaluation.test_judge import Server
from tests.conftest import REPO
from tests.evaluation.test_readers_metrics import FIXTURES


@pytest.fixture
def fake_ckpt(tmp_path):
    d = tmp_path / "run--step=60-last"
    d.mkdir()
    (d / "metadata.json").write_text("{}")
    return d


def _evaluate(capsys, *args) -> tuple[int, str]:
    """(exit code, the error line) as `avllm evaluate` gives them (in process: Hydra's logging
    set-up and pytest's capture do not mix; test_exit_code_2 runs the real command once)."""
    from nemo_avllm import config
    from nemo_avllm.errors import UserError
    from nemo_avllm.evaluation.evaluate import main

    try:
        return main(config.load("evaluate", [cli.quote_override(str(a)) for a in args])), ""
    except UserError as e:
        return 2, cli.user_error(e, "avllm evaluate", "evaluate", [])


def test_exit_code_2_before_the_model(tmp_path, fake_ckpt):
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", "evaluate", "benchmark=music_avqa",
                           f"benchmark.annotations={FIXTURES / 'music_avqa/avqa-test.head150.json'}",
                           "benchmark.video_root=/nonexistent", f"checkpoint={fake_ckpt}", f"out_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1:] == [
        "avllm evaluate: error: benchmark.video_root=/nonexistent does not exist (pattern tried: "
        "/nonexistent/00000093.mp4); set benchmark.video_root, benchmark.video_ext"]


def test_no_media_is_refused_naming_folder_and_pattern(tmp_path, fake_ckpt, capsys):
    ann = FIXTURES / "music_avqa/avqa-test.head150.json"
    base = ["benchmark=music_avqa", f"benchmark.annotations={ann}", f"checkpoint={fake_ckpt}", f"out_dir={tmp_path / 'e'}"]
    code, err = _evaluate(capsys, *base, "benchmark.video_root=/nonexistent")
    assert code == 2 and err.count("\n") == 0
    assert "benchmark.video_root=/nonexistent does not exist (pattern tried: /nonexistent/00000093.mp4)" in err
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "00000093.avi").write_bytes(b"x")
    code, err = _evaluate(capsys, *base, f"benchmark.video_root={videos}")  # empty of .mp4: the wrong extension
    assert code == 2 and f"none of the 150 questions' media are under benchmark.video_root={videos}" in err
    assert "benchmark.video_ext" in err
    code, err = _evaluate(capsys, *base[1:], "benchmark=music_avqa", "benchmark.annotations=/nonexistent/avqa-test.json")
    assert code == 2 and err.startswith("benchmark.annotations: annotation file /nonexistent/avqa-test.json not found")
    assert not (tmp_path / "e").exists()  # nothing written, no model loaded


def test_nextqa_official_layout_without_mapping(tmp_path, fake_ckpt, capsys):
    ann = FIXTURES / "nextqa/val.head150.csv"
    it = B.read("nextqa", annotations=ann)[0]
    videos = tmp_path / "NExTVideo"
    (videos / "1006").mkdir(parents=True)
    (videos / "1006" / it.video).write_bytes(b"x")  # the official <dir>/<vidor id>.mp4 layout
    code, err = _evaluate(capsys, "benchmark=nextqa", f"benchmark.annotations={ann}", f"benchmark.video_root={videos}",
                          f"checkpoint={fake_ckpt}", f"out_dir={tmp_path / 'e'}")
    assert code == 2 and "benchmark.mapping (NExT-QA's map_vid_vidorID.json" in err


def _msrvtt(tmp_path):
    ann = FIXTURES / "msrvtt_qa/who_test_qa_1000.head150.json"
    items = B.read("msrvtt_qa", annotations=ann)
    videos = tmp_path / "videos"
    videos.mkdir()
    for it in items[:3]:
        (videos / it.video).write_bytes(b"x")
    return ann, items, videos


def test_judge_is_checked_before_generation(tmp_path, fake_ckpt, capsys, monkeypatch):
    ann, _, videos = _msrvtt(tmp_path)
    base = ["benchmark=msrvtt_qa", f"benchmark.annotations={ann}", f"benchmark.video_root={videos}",
            f"checkpoint={fake_ckpt}", f"out_dir={tmp_path / 'e'}", f"judge.client.cache_dir={tmp_path / 'c'}"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, err = _evaluate(capsys, *base)
    assert code == 2 and "judge.client.api_key_env (OPENAI_API_KEY) is not set" in err
    s = Server()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        local = base + [f"judge.client.base_url={s.url}", "judge.client.api_key_env=JUDGE_KEY", "judge.client.max_retries=0"]
        code, err = _evaluate(capsys, *local, "judge.client.model=retired-0613")
        assert code == 2 and "judge.client.model=retired-0613: the server at judge.client.base_url=" in err
        assert s.models == ["retired-0613"]  # one probe request, then nothing
    finally:
        s.httpd.shutdown()
    assert not list((tmp_path / "e").glob("*/predictions*"))


def test_predictions_file_scored_without_a_model_and_judge_failure_keeps_exact(tmp_path, capsys, monkeypatch):
    ann, items, _ = _msrvtt(tmp_path)
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"qid": it.qid, "prediction": f"The answer is {it.answer}."}) + "\n"
                             for it in items[:100]))
    s = Server()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        base = ["benchmark=msrvtt_qa", f"benchmark.annotations={ann}", f"predictions={preds}",
                f"judge.client.base_url={s.url}", "judge.client.api_key_env=JUDGE_KEY", "judge.client.max_retries=0",
                f"judge.client.cache_dir={tmp_path / 'c'}", "judge.client.model=pinned"]
        # the probe passes, then every judgment fails (HTTP 400): exact match is still written, exit 1
        s.fail_judgments = True
        code, err = _evaluate(capsys, *base)
    finally:
        s.httpd.shutdown()
    res = json.loads((tmp_path / "predictions.scored" / "results.json").read_text())
    assert code == 1 and "error" in res["scores"]["judge"]
    assert res["scores"]["exact"]["accuracy"] == 1.0 and res["scores"]["exact"]["n"] == 100
    assert res["partial"] and res["answered"] == 100 and res["questions"] == 150
    assert res["headline"]["metric"] == "exact:accuracy"
    assert "(partial: 100/150)" in (tmp_path / "predictions.scored" / "results.md").read_text()
    # a file of another benchmark is refused, naming it
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"qid": "nope", "prediction": "x"}) + "\n")
    code, err = _evaluate(capsys, "benchmark=msrvtt_qa", f"benchmark.annotations={ann}", f"predictions={other}",
                          "judge.enabled=false")
    assert code == 2 and f"predictions={other}: 1 of 1 question ids (e.g. 'nope') are not in benchmark msrvtt_qa" in err


def test_predictions_scored_with_a_local_judge_record_served_model(tmp_path, capsys, monkeypatch):
    ann, items, _ = _msrvtt(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ann, tmp_path / "ann.json")
    (run / "predictions.rank0.jsonl").write_text("".join(
        json.dumps({"qid": it.qid, "prediction": "cat" if i % 2 else "dog"}) + "\n" for i, it in enumerate(items)))
    s = Server()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        code, err = _evaluate(capsys, "benchmark=msrvtt_qa", f"benchmark.annotations={ann}", f"predictions={run}",
                              f"judge.client.base_url={s.url}", "judge.client.api_key_env=JUDGE_KEY",
                              f"judge.client.cache_dir={tmp_path / 'c'}", "judge.client.model=pinned",
                              "judge.client.max_concurrency=4")
    finally:
        s.httpd.shutdown()
    res = json.loads((run / "results.json").read_text())
    assert code == 0 and not res["partial"]
    assert res["scores"]["judge"]["accuracy"] == 0.5 and res["scores"]["judge"]["judge"]["served_model"] == ["served:pinned"]
    assert res["headline"] == {"metric": "judge:accuracy", "value": 50.0, "paper": 60.4}
