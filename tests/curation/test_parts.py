"""The curation's parts without models: JSON replies, Table-1 planning, prompts, the LLM client's
failure handling against a real local HTTP server, and the cache."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nemo_avllm import config
from nemo_avllm.curation import instructions as ins
from nemo_avllm.curation.cache import VideoCache
from nemo_avllm.runtime.openai_client import ChatClient, LLMError, Usage, api_key, parse_json_reply
from nemo_avllm.curation.prompts import PromptSet
from tests.curation.helpers import ChatServer


@pytest.mark.parametrize("reply,want", [
    ('{"a": 1}', {"a": 1}),
    ('Sure, here it is:\n```json\n{"a": 1}\n```\nAnything else?', {"a": 1}),
    ('The answer is {"a": 1,} as requested.', {"a": 1}),
    ('```\n[{"a": 1}]\n```', [{"a": 1}]),
    ('braces in strings: {"b": "} {", "c": [1, 2]} and more', {"b": "} {", "c": [1, 2]}),
    ('{oops} then {"a": 1}', {"a": 1}),
])
def test_parse_json_reply_tolerates_what_llms_write(reply, want):
    assert parse_json_reply(reply) == want


def test_parse_json_reply_rejects_truncated():
    with pytest.raises(ValueError, match="no JSON object"):
        parse_json_reply('Sure! {"conversations": [{"question": "Why", "answer": "Because')


def test_targets_follow_table1_and_plan_respects_audio():
    cfg = config.load("curate", ["input=x", "out_dir=y"]).instructions
    t = ins.targets(OmegaConf.merge(cfg, {"per_video": 2.6}), 100_000)  # the paper's 260k
    assert sum(t.values()) == 260_000
    assert t[("description", "V")] == 50_000 and t[("conversation", "AV")] == 40_000 and t[("reasoning", "A")] == 5_000
    videos = {"v1": True, "v2": False, "v3": False, "v4": True}
    reqs, short = ins.plan({("description", "A"): 3, ("conversation", "V"): 4, ("reasoning", "AV"): 1}, videos, seed=1)
    assert not short and len(reqs) == 8
    assert all(videos[r.video_id] for r in reqs if r.modality != "V")  # audio cells only from videos with audio
    assert len({r.uid for r in reqs}) == 8  # a repeated cell gets a new variant
    load = {v: sum(r.video_id == v for r in reqs) for v in videos}
    assert max(load.values()) - min(load.values()) <= 1  # spread evenly
    _, short = ins.plan({("description", "A"): 2}, {"v": False}, seed=0)
    assert short == {"description/A": 2}


def test_instruction_prompt_has_the_four_parts_for_every_cell():
    p = PromptSet.load(None, "v1")
    for t in ins.TYPES:
        for m in ins.MODALITIES:
            user = p.instruction(t, m, "A dog barks at a red ball.")[1]["content"]
            pos = [user.index(k) for k in ("ROLE:", "REQUIREMENT:", "EXAMPLE:", "CONTEXT (")]
            assert pos == sorted(pos) and "A dog barks at a red ball." in user
            assert "{" not in user.split("EXAMPLE:")[0]  # every placeholder filled


def test_reply_check_and_manifest_line():
    with pytest.raises(ValueError):
        ins.check_reply({"conversations": [{"question": "q"}]})
    pairs = ins.check_reply({"conversations": [{"question": "<image> What?", "answer": "A <VIS> dog."}]})
    assert pairs == [("What?", "A dog.")]  # only the pipeline places modality tokens
    item = ins.Item(ins.Request("vid", "conversation", "AV"), pairs + [("And?", "Barks.")], "ctx")
    line = ins.to_manifest_line(item, "/v.mp4", None)
    assert [t["value"] for t in line["conversations"]] == ["<AUD_VIS> What?", "A dog.", "And?", "Barks."]


def _llm_cfg(url, **kw):
    base = {"base_url": url, "model": "m", "api_key_env": "AVLLM_TEST_KEY", "temperature": 0.0, "max_tokens": 64,
            "timeout_s": 5, "max_concurrency": 2, "requests_per_minute": 0, "max_retries": 2, "backoff_s": 0.01,
            "backoff_max_s": 0.05, "json_retries": 1}
    return OmegaConf.create({**base, **kw})


def test_client_gives_up_on_client_errors_and_bad_json(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    with ChatServer(respond=lambda body, n: (400, "bad request")) as s:
        c = ChatClient(_llm_cfg(s.url), "v1")
        with pytest.raises(LLMError, match="BadRequest"):
            c.chat("x", msgs)
        assert len(s.requests) == 1 and c.usage.failures == 1  # a 400 is not retried
    with ChatServer(respond=lambda body, n: (503, "down")) as s:
        c = ChatClient(_llm_cfg(s.url), "v1")
        with pytest.raises(LLMError):
            c.chat("x", msgs)
        assert len(s.requests) == 3 and c.usage.retries == 2  # max_retries=2
    with ChatServer(respond=lambda body, n: (200, "no json here")) as s:
        c = ChatClient(_llm_cfg(s.url), "v1")
        with pytest.raises(LLMError, match="not the JSON"):
            c.chat("x", msgs, expect_json=True)
        assert len(s.requests) == 2 and c.usage.json_retries == 1


def test_client_caches_by_prompt_version_and_variant(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    with ChatServer(respond=lambda body, n: (200, f"reply {n}")) as s:
        cache = VideoCache(tmp_path, "vid")
        c = ChatClient(_llm_cfg(s.url), "v1", Usage())
        assert c.chat("x", msgs, cache) == "reply 0"
        assert c.chat("x", msgs, cache) == "reply 0" and len(s.requests) == 1
        assert c.chat("x", msgs, cache, variant=1) == "reply 1"
        assert ChatClient(_llm_cfg(s.url), "v2").chat("x", msgs, cache) == "reply 2"  # new prompt version
        assert c.usage.calls == 2 and c.usage.cached_calls == 1


def test_api_key_only_from_the_environment(monkeypatch):
    monkeypatch.delenv("AVLLM_TEST_KEY", raising=False)
    with pytest.raises(LLMError, match="AVLLM_TEST_KEY"):
        api_key(_llm_cfg("https://api.openai.com/v1"))
    assert api_key(_llm_cfg("http://127.0.0.1:8000/v1")) == "EMPTY"  # local servers take any key
    monkeypatch.setenv("AVLLM_TEST_KEY", "k")
    assert api_key(_llm_cfg("https://api.openai.com/v1")) == "k"


def test_bad_settings_are_named(tmp_path):
    from nemo_avllm.curation.captions import Captioner, load_labels

    cfg = config.load("curate", ["input=x", "out_dir=y", f"captions.frame.model={tmp_path / 'no_such_model'}",
                                 "captions.device=cpu"])
    with pytest.raises(FileNotFoundError, match="captions.frame.model=.*not a folder"):
        Captioner(cfg.captions).frame
    with pytest.raises(FileNotFoundError, match=r"prompts.version='v9'.*versions there: \['v1'\]"):
        PromptSet.load(None, "v9")
    with pytest.raises(FileNotFoundError, match="captions.audio.labels"):
        load_labels(str(tmp_path / "labels.txt"))
    assert len(load_labels("audioset")) == 527 and load_labels("audioset")[0] == "Speech"


def test_client_caps_concurrency_and_rate():
    import threading
    import time

    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def respond(body, n):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return 200, "ok"

    with ChatServer(respond=respond) as s:
        c = ChatClient(_llm_cfg(s.url, max_concurrency=2), "v1")
        threads = [threading.Thread(target=c.chat, args=("x", [{"role": "user", "content": str(i)}])) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(s.requests) == 6 and state["max"] == 2
        c = ChatClient(_llm_cfg(s.url, max_concurrency=8, requests_per_minute=600), "v1")  # one start per 0.1 s
        t0 = time.monotonic()
        threads = [threading.Thread(target=c.chat, args=("y", [{"role": "user", "content": str(i)}])) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() - t0 >= 0.4 + 0.2


def test_shards_are_disjoint_and_cover_the_input():
    from nemo_avllm.curation.pipeline import shard

    items = list(range(10))
    parts = [shard(items, OmegaConf.create({"index": i, "count": 3})) for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="shard.index=3"):
        shard(items, OmegaConf.create({"index": 3, "count": 3}))
