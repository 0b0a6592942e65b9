"""The GPT judge against a real HTTP server on 127.0.0.1 speaking the chat-completions protocol
(`http.server`, started by the test): normal, fenced and malformed replies, 429s, 500s, a
timeout, the on-disk cache and the usage record; the consistency dimension on paired questions
read from Video-ChatGPT's consistency_qa.json format; the probe before generation, concurrent
requests under `max_concurrency`, unparseable replies re-asked and never cached."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nemo_avllm.evaluation.benchmarks import EvalItem
from nemo_avllm.evaluation.judge import Judge, JudgeConfig, judge_qa, parse_reply
from nemo_avllm.runtime.openai_client import LLMError


class Server:
    """Replies chosen by the predicted answer in the prompt; counts requests per prediction."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.models: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self.fail_judgments = False
        self.lock = threading.Lock()
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path.endswith("/chat/completions") and self.headers["Authorization"] == "Bearer sk-test"
                srv.models.append(body["model"])
                if body["model"] == "retired-0613":
                    return self._send(404, {"error": {"message": "The model does not exist", "code": "model_not_found"}})
                with srv.lock:
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                try:
                    time.sleep(srv.delay)
                    self._answer(body)
                finally:
                    with srv.lock:
                        srv.in_flight -= 1

            def _answer(self, body):
                user = [m for m in body["messages"] if m["role"] == "user"][0]["content"]  # a re-ask appends turns
                if user == "Reply with the word OK.":  # the probe
                    return self._send(200, {"id": "p", "object": "chat.completion", "created": 0,
                                            "model": "served:" + body["model"],
                                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"},
                                                         "finish_reason": "stop"}]})
                if srv.fail_judgments:  # an outage after the probe
                    return self._send(400, {"error": {"message": "judge unavailable"}})
                if "Predicted Answer to Question 1: " in user:  # consistency: 5 when both answers agree
                    p1, p2 = (user.split(f"Predicted Answer to Question {k}: ")[1].split("\n")[0] for k in (1, 2))
                    srv.pairs.append((p1, p2))
                    text = "no idea" if "?" in p1 else "{''score': 4.8}" if p1 == p2 else "{'score': 1}"
                    return self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                         "finish_reason": "stop"}]})
                pred = user.split("Predicted Answer: ")[1].split("\n")[0]
                with srv.lock:
                    n = srv.hits[pred] = srv.hits.get(pred, 0) + 1
                if pred == "busy" and n <= 2:
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}})
                if pred == "flaky" and n == 1:
                    return self._send(500, {"error": {"message": "boom"}})
                if pred == "slow" and n == 1:
                    time.sleep(1.5)
                text = {"cat": "{'pred': 'yes', 'score': 5}", "dog": "```python\n{\"pred\": \"no\", \"score\": 1}\n```",
                        "busy": "{'pred': 'yes', 'score': 4}", "flaky": "Sure! pred: yes, score: 3",
                        "slow": "{'pred': 'no', 'score': 2}"}.get(pred, "I cannot evaluate this.")
                if pred == "late" and len(body["messages"]) > 2:  # usable only when asked again
                    text = "{'pred': 'yes', 'score': 3}"
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "served:" + body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_parse_reply():
    assert parse_reply("{'pred': 'yes', 'score': 4.8}") == (True, 4.8)
    assert parse_reply('Here: {"pred": "no", "score": "2"}') == (False, 2.0)
    assert parse_reply("pred = Yes; score = 3") == (True, 3.0)
    assert parse_reply("yes") == (None, None)
    assert parse_reply("{'score': 4}", want_pred=False) == (None, 4.0)


def test_judge_over_http(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = JudgeConfig(base_url=server.url, model="judge-pinned-0613", api_key_env="JUDGE_KEY",
                      cache_dir=str(tmp_path / "cache"), timeout_s=1.0, max_retries=3, backoff_s=0.05,
                      price_per_1m_input=1000.0, price_per_1m_output=2000.0)
    items = [EvalItem(q, "v", f"question {q}?", "ref") for q in ("a", "b", "c", "d", "e", "f")]
    preds = dict(zip("abcdef", ["cat", "dog", "busy", "flaky", "slow", "gibberish"]))
    r = judge_qa(Judge(cfg), preds, items)
    # yes: cat, busy, flaky; no: dog, slow; unparseable: gibberish (reported, not guessed)
    assert r["n"] == 5 and r["accuracy"] == pytest.approx(3 / 5)
    assert r["score"] == pytest.approx((5 + 1 + 4 + 3 + 2) / 5)
    assert r["unparseable"] == 1 and r["unparseable_ids"] == ["f"]
    # gibberish: asked, then re-asked json_retries=2 times
    assert server.hits == {"cat": 1, "dog": 1, "busy": 3, "flaky": 2, "slow": 2, "gibberish": 3}
    u = r["judge_usage"]
    assert u["calls"] == 8 and u["retries"] == 4 and u["prompt_tokens"] == 800
    assert u["cost_usd"] == pytest.approx(0.8 + 0.16)
    assert r["judge"]["model"] == "judge-pinned-0613" and "sk-test" not in json.dumps(r)
    assert r["judge"]["served_model"] == ["served:judge-pinned-0613"]  # what the server says answered
    assert set(server.models) == {"judge-pinned-0613"}
    # the parsed judgments are cached on disk: a second run asks only the unparseable one again
    again = judge_qa(Judge(cfg), preds, items)
    assert again["accuracy"] == r["accuracy"] and again["judge_usage"]["cached"] == 5
    assert server.hits["gibberish"] == 6 and sum(server.hits.values()) == 15
    # another judge model is another cache key
    judge_qa(Judge(JudgeConfig(**{**cfg.__dict__, "model": "other"})), {"a": "cat"}, items[:1])
    assert server.hits["cat"] == 2


def test_key_only_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="judge.client.api_key_env .NO_SUCH_KEY. is not set"):
        Judge(JudgeConfig(api_key_env="NO_SUCH_KEY", cache_dir=str(tmp_path)))


def test_gives_up_after_retries(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = JudgeConfig(base_url=server.url, model="m", api_key_env="JUDGE_KEY", cache_dir=str(tmp_path),
                      max_retries=1, backoff_s=0.01)
    with pytest.raises(RuntimeError, match="failed after 2 attempts"):
        Judge(cfg).qa("q", "a", "busy")


def test_consistency_pairs_two_phrasings(server, tmp_path, monkeypatch):
    """Video-ChatGPT's consistency_qa.json: each entry is one question asked two ways; the judge
    scores the two answers together, once per pair; a pair with an unanswered phrasing is counted."""
    from nemo_avllm.evaluation import benchmarks as B

    ann = tmp_path / "consistency_qa.json"
    ann.write_text(json.dumps([
        {"video_name": "v_abc", "Q1": "What colour is the car?", "Q2": "Which colour does the car have?", "A": "red"},
        {"video_name": "v_abc", "Q1": "Who is driving?", "Q2": "Who drives the car?", "A": "a woman"},
        {"video_name": "v_def", "Q1": "Is it raining?", "Q2": "Does it rain in the video?", "A": "no"},
        {"video_name": "v_ghi", "Q1": "How many dogs?", "Q2": "Count the dogs.", "A": "two"},
    ]))
    items = B.read("videochatgpt", annotations=ann)
    assert [it.qid for it in items[:2]] == ["0_q1", "0_q2"] and items[1].question == "Which colour does the car have?"
    assert items[0].video == "v_abc.mp4" and items[0].meta == {"pair": "0", "phrasing": 1}
    generic = tmp_path / "generic_qa.json"
    generic.write_text(json.dumps([{"video_name": "v_abc", "Q": "What happens?", "A": "A car drives by."}]))
    assert [(it.qid, it.question, it.meta) for it in B.read("videochatgpt", annotations=generic)] == [("0", "What happens?", {})]
    generic.write_text(json.dumps([{"video_name": "v_abc", "Q": "What happens?"}]))
    with pytest.raises(B.AnnotationError, match=r"generic_qa.json\[0\]: missing field 'A'"):
        B.read("videochatgpt", annotations=generic)
    preds = {"0_q1": "cat", "0_q2": "cat", "1_q1": "cat", "1_q2": "dog", "2_q1": "what?", "2_q2": "cat", "3_q1": "cat"}
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = JudgeConfig(base_url=server.url, model="m", api_key_env="JUDGE_KEY", cache_dir=str(tmp_path / "c"))
    r = judge_qa(Judge(cfg), preds, items, ["consistency"])
    assert sorted(server.pairs) == [("cat", "cat"), ("cat", "dog")] + [("what?", "cat")] * 3  # unparseable: re-asked twice
    assert r["dim_consistency"] == pytest.approx((4.8 + 1) / 2)
    assert r["consistency_pairs"] == 2 and r["consistency_pairs_unanswered"] == 1
    assert "pair 2:consistency" in r["unparseable_ids"]
    with pytest.raises(ValueError, match="unknown \\['consistancy'\\]"):
        judge_qa(Judge(cfg), preds, items, ["consistancy"])
    # no pairs in a benchmark without them: said, not a silent 0
    r = judge_qa(Judge(cfg), {"a": "cat"}, [EvalItem("a", "v", "q?", "ref")], ["consistency"])
    assert "dim_consistency" not in r and "no paired questions" in r["consistency_note"]


def test_evaluate_scores_with_the_judge_from_config(server, tmp_path, monkeypatch):
    """`avllm evaluate`'s scoring step builds the judge from conf/evaluate.yaml's keys."""
    from nemo_avllm import config
    from nemo_avllm.evaluation.evaluate import headline, score

    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = config.load("evaluate", ["benchmark=activitynet_qa", f"judge.client.base_url={server.url}",
                                   "judge.client.model=pinned-judge", "judge.client.api_key_env=JUDGE_KEY",
                                   f"judge.client.cache_dir={tmp_path}", "judge.dimensions=[detail]"])
    items = [EvalItem("q1", "v.mp4", "is it a cat?", "yes"), EvalItem("q2", "v.mp4", "is it a dog?", "no")]
    s = score(cfg, items, {"q1": "cat", "q2": "dog"})
    assert s["judge"]["accuracy"] == 0.5 and s["judge"]["judge"]["model"] == "pinned-judge"
    assert s["judge"]["unparseable"] == 0 and s["judge"]["dim_detail"] == pytest.approx((5 + 1) / 2)
    assert s["exact"]["n"] == 2 and headline(s) == ("judge:accuracy", 50.0)


def test_unparseable_is_reasked_not_cached(server, tmp_path, monkeypatch):
    """A reply that becomes usable when asked again is used (and cached); one that never does is
    reported and asked again by the next run, not cached as final."""
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = JudgeConfig(base_url=server.url, model="m", api_key_env="JUDGE_KEY", cache_dir=str(tmp_path), json_retries=1)
    v = Judge(cfg).qa("q?", "ref", "late")
    assert (v.yes, v.score) == (True, 3.0) and server.hits["late"] == 2
    assert Judge(cfg).qa("q?", "ref", "late").score == 3.0 and server.hits["late"] == 2  # cached
    assert Judge(cfg).qa("q?", "ref", "nonsense").yes is None and server.hits["nonsense"] == 2
    assert Judge(cfg).qa("q?", "ref", "nonsense").yes is None and server.hits["nonsense"] == 4
    assert not [f for f in tmp_path.iterdir() if "nonsense" in f.read_text()]


@pytest.mark.parametrize("limit", [1, 4])
def test_requests_run_concurrently_under_the_limit(server, tmp_path, monkeypatch, limit):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    server.delay = 0.1
    cfg = JudgeConfig(base_url=server.url, model="m", api_key_env="JUDGE_KEY", cache_dir=str(tmp_path),
                      max_concurrency=limit)
    items = [EvalItem(str(i), "v", f"q{i}?", "ref") for i in range(12)]
    r = judge_qa(Judge(cfg), {str(i): "cat" if i % 2 else "dog" for i in range(12)}, items)
    assert r["n"] == 12 and r["accuracy"] == 0.5
    assert server.max_in_flight == limit  # each request takes 0.1 s: `limit` of them overlap, never more


def test_probe_names_the_judge_keys(server, tmp_path, monkeypatch):
    """Checked before any answer is generated: the served model id comes back; a retired model, a
    wrong URL and a missing key each end in one line naming the judge.client key to fix."""
    from nemo_avllm.errors import UserError

    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    cfg = JudgeConfig(base_url=server.url, model="pinned", api_key_env="JUDGE_KEY", cache_dir=str(tmp_path),
                      max_retries=1, backoff_s=0.01)
    assert Judge(cfg).probe() == "served:pinned"
    with pytest.raises(UserError, match=r"judge.client.model=retired-0613: .* does not serve it \(404\)"):
        Judge(JudgeConfig(**{**cfg.__dict__, "model": "retired-0613"})).probe()
    with pytest.raises(UserError, match=r"judge.client.base_url=http://127.0.0.1:9/v1 .* did not answer"):
        Judge(JudgeConfig(**{**cfg.__dict__, "base_url": "http://127.0.0.1:9/v1"})).probe()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match=r"judge.client.api_key_env \(OPENAI_API_KEY\) is not set"):
        Judge(JudgeConfig(cache_dir=str(tmp_path)))
