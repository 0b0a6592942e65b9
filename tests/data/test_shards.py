"""Webdataset shards: media and feature round trips, MAT batches over streams, DP/worker split,
determinism, exact resume and bad-record replacement."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.data.dataset import AVDataset
from nemo_avllm.data.features import FeatureCacheError
from nemo_avllm.data.loaders import train_loader
from nemo_avllm.data.manifest_checks import validate_manifest
from nemo_avllm.data.shard_writer import write_shards
from nemo_avllm.data.shards import ShardStream
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training.data import decode_settings, model_spec
from nemo_avllm.training.feature_cache import build_encoders, build_feature_cache, model_fields, open_cache
from tests.media_factory import conv, make_media_set, FFMPEG

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")

RATIOS = {"V": 0.5, "A": 0.2, "AV": 0.3}



@pytest.fixture(scope="module")
def cfg():
    return config.load_model("tiny", ["allow_random_init=true"])  # tiny encoders: no pretrained weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharddata")
    make_media_set(d)
    base = [
        ("v", "mute.mp4", conv("<VIS> What colour?", "Red.")),
        ("img", "still.png", conv("<VIS> Describe the image.", "A square.")),
        ("a", "av1.mp4", conv("<AUD> What sound?", "A low tone.")),
        ("av", "av1.mp4", conv("<AUD_VIS> Describe.", "A red square and a tone.")),
        ("av2", "av2.webm", conv("<VIS> Colour?", "Green.", "<AUD> Sound?", "High.")),
    ]
    views = {"V": conv("<VIS> What colour?", "Red."), "A": conv("<AUD> What sound?", "A low tone.")}
    lines = [{"id": f"{n}-{k}", "video": v, "conversations": c, **({"views": views} if n == "av" else {})}
             for k in range(3) for n, v, c in base]  # 15
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, report = validate_manifest(path)
    assert report.ok and len(samples) == 15
    bad_path = d / "with_bad.jsonl"
    bad_path.write_text(path.read_text() + json.dumps(
        {"id": "bad", "video": "corrupt.mp4", "conversations": conv("<VIS> What moves?", "A circle.")}) + "\n")
    with_bad, _ = validate_manifest(bad_path)
    return d, samples, with_bad


@pytest.fixture(scope="module")
def media_shards(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    report = write_shards(data[1], out, samples_per_shard=2, seed=0)
    assert (report.written, report.skipped) == (15, 0)
    return out


def stream(path, tokenizer, cfg, **kw):
    kw.setdefault("max_length", 128)
    kw.setdefault("max_epochs", 1)
    return ShardStream(path, tokenizer, avllm_config(cfg).layout(), decode_settings(avllm_config(cfg)), **kw)


def ids(micro_batches):
    return [[(it["id"], it["modality"]) for it in mb] for mb in micro_batches]


def test_shard_files_hold_json_and_media(media_shards, data):
    meta = json.loads((media_shards / "shards.json").read_text())
    assert meta["content"] == "media" and meta["total"] == 15
    assert [e["file"] for e in meta["shards"]] == [
        "V-000000.tar", "V-000001.tar", "V-000002.tar", "A-000000.tar", "A-000001.tar",
        "AV-000000.tar", "AV-000001.tar", "AV-000002.tar"]
    assert sum(e["views"]["V"] for e in meta["shards"]) == 6 + 3  # 6 visual samples + the V views of 3 AV ones
    assert sum(e["views"]["A"] for e in meta["shards"]) == 3 + 3
    with tarfile.open(media_shards / "A-000000.tar") as t:
        names = t.getnames()
    assert names == ["a000000000.json", "a000000000.video.mp4", "a000000001.json", "a000000001.video.mp4"]


def test_media_shards_round_trip_to_the_same_items_as_the_dataset(media_shards, data, tokenizer, cfg):
    _, samples, _ = data
    got = [it for mb in stream(media_shards, tokenizer, cfg, global_batch_size=15, micro_batch_size=5) for it in mb]
    assert sorted(it["id"] for it in got) == sorted(s.id for s in samples)  # every sample once, no MAT
    ds = AVDataset(samples, tokenizer, avllm_config(cfg).layout(), decode_settings(avllm_config(cfg)), max_length=128)
    by_id = {s.id: i for i, s in enumerate(samples)}
    for it in got:
        ref = ds[by_id[it["id"]]]
        assert it["modality"] == ref["modality"] and it["tokens"] == ref["tokens"]
        assert set(it) == set(ref) - {"index"}
        for key in ("video", "audio"):
            if key in ref:
                assert torch.equal(it[key], ref[key])


def test_mat_batches_over_streams_exact_counts_disjoint_ranks_deterministic(media_shards, tokenizer, cfg):
    kw = dict(global_batch_size=10, micro_batch_size=1, ratios=RATIOS, derive_views=True, seed=3)
    ranks = [ids(stream(media_shards, tokenizer, cfg, dp_rank=r, dp_size=2, **kw)) for r in range(2)]
    assert all(len(r) == 5 for r in ranks)  # 15 samples // 10 = 1 global batch, 5 micro-batches per rank
    assert Counter(m for r in ranks for mb in r for _, m in mb) == {"V": 5, "A": 2, "AV": 3}
    flat = [set(x for mb in r for x in mb) for r in ranks]
    assert not flat[0] & flat[1]  # ranks read disjoint parts of each stream
    again = ids(stream(media_shards, tokenizer, cfg, dp_rank=1, dp_size=2, **kw))
    other_seed = ids(stream(media_shards, tokenizer, cfg, dp_rank=1, dp_size=2, **dict(kw, seed=4)))
    assert again == ranks[1] and other_seed != ranks[1]


def test_resume_from_consumed_samples_equals_the_uninterrupted_stream(media_shards, tokenizer, cfg):
    kw = dict(global_batch_size=5, micro_batch_size=1, ratios=RATIOS, derive_views=True, seed=1, max_epochs=2)
    full = ids(stream(media_shards, tokenizer, cfg, **kw))
    assert len(full) == 2 * 3 * 5  # 2 epochs of 15 // 5 = 3 global batches of 5 micro-batches
    for step in (1, 4):
        resumed = stream(media_shards, tokenizer, cfg, **kw)
        resumed.load_state_dict({"consumed_samples": step * 5})
        assert ids(resumed) == full[step * 5 :]


def test_loader_with_workers_is_deterministic_and_keeps_ratios(media_shards, tokenizer, cfg):
    spec = model_spec(cfg, global_batch_size=10, micro_batch_size=2, seq_length=96, mat_ratios=RATIOS,
                      derive_views=True, seed=2, num_workers=2)
    a = list(train_loader(spec, media_shards, tokenizer, shard_epochs=1))
    b = list(train_loader(spec, media_shards, tokenizer, shard_epochs=1))
    assert [x["ids"] for x in a] == [x["ids"] for x in b] and len(a) == 5
    assert all(x["input_ids"].shape == (2, 96) for x in a)
    assert Counter(m for x in a for m in x["modality"]) == {"V": 5, "A": 2, "AV": 3}


def test_corrupt_record_is_replaced_by_the_next_good_one(data, tokenizer, cfg, tmp_path):
    d, _, with_bad = data
    write_shards(with_bad, tmp_path, samples_per_shard=100, seed=0)
    got = [it for mb in stream(tmp_path, tokenizer, cfg, global_batch_size=16, micro_batch_size=4) for it in mb]
    assert len(got) == 16 and "bad" not in {it["id"] for it in got}
    replaced = [it for it in got if it["bad_media"]]
    assert len(replaced) == 1 and replaced[0]["bad_media"] == [str(d / "corrupt.mp4")]
    assert replaced[0]["modality"] == "V"  # same stream, same view


def test_fewer_shards_than_consumers_are_split_by_record(data, tokenizer, cfg, tmp_path):
    write_shards(data[1], tmp_path, samples_per_shard=100)  # one shard per modality class: 3 < 4 ranks
    ranks = [[it["id"] for mb in stream(tmp_path, tokenizer, cfg, global_batch_size=12, micro_batch_size=3,
                                          dp_rank=r, dp_size=4) for it in mb] for r in range(4)]
    assert [len(r) for r in ranks] == [3, 3, 3, 3]
    assert len(set().union(*map(set, ranks))) == 12  # disjoint


def test_feature_shards_round_trip_and_refuse_another_config(data, tokenizer, cfg, tmp_path):
    _, samples, _ = data
    torch.manual_seed(0)
    build_feature_cache(samples, tmp_path / "cache", cfg, encoders=build_encoders(cfg), progress=False)
    cache = open_cache(tmp_path / "cache", cfg)
    report = write_shards(samples, tmp_path / "shards", feature_cache=cache)
    assert report.written == 15 and json.loads((tmp_path / "shards" / "shards.json").read_text())["content"] == "features"
    got = [it for mb in stream(tmp_path / "shards", tokenizer, cfg, global_batch_size=15, micro_batch_size=15,
                               feature_fields=model_fields(cfg)) for it in mb]
    media_of = {s.id: s.media_id for s in samples}
    assert len(got) == 15
    for it in got:
        ref = cache.get(media_of[it["id"]])
        assert "video" not in it and set(it["features"]) <= set(ref)
        for kind, t in it["features"].items():
            assert torch.equal(t, ref[kind])
    with pytest.raises(FeatureCacheError, match="num_frames: cache 4, model 8"):
        stream(tmp_path / "shards", tokenizer, cfg, global_batch_size=15, micro_batch_size=15,
               feature_fields=model_fields(config.load_model("tiny", ["num_frames=8"])))


def test_prepared_shards_carry_the_flac_side_car(data, tokenizer, cfg, tmp_path):
    from nemo_avllm.data.prepare import prepare

    d, samples, _ = data
    prepare(d / "train.jsonl", tmp_path / "prep", num_workers=1, progress=False)
    write_shards(samples, tmp_path / "shards", index=tmp_path / "prep", samples_per_shard=100)
    with tarfile.open(tmp_path / "shards" / "A-000000.tar") as t:
        assert "a000000000.audio.flac" in t.getnames()
    got = [it for mb in stream(tmp_path / "shards", tokenizer, cfg, global_batch_size=15, micro_batch_size=15)
           for it in mb if it["modality"] == "A"]
    ref = AVDataset(samples, tokenizer, avllm_config(cfg).layout(), decode_settings(avllm_config(cfg)))
    by_id = {s.id: i for i, s in enumerate(samples)}
    assert len(got) == 3
    for it in got:
        assert (it["audio"] - ref[by_id[it["id"]]]["audio"]).abs().max() < 1e-3  # 16-bit FLAC of the same track


def test_schedule_and_rank_shares_follow_the_sampler_plan(media_shards, data, tokenizer, cfg):
    """pt2 over shards, DP=2: each step's micro-batches hold exactly the modalities the
    `MATBatchSampler` plan gives that rank (V or A batches, then AV), from disjoint records."""
    from nemo_avllm.data.mat_sampler import MATBatchSampler

    kw = dict(global_batch_size=4, micro_batch_size=2, ratios=RATIOS, derive_views=True, seed=6, max_epochs=1,
              schedule="pt2", schedule_split=0.5, max_steps=4)
    got = [ids(stream(media_shards, tokenizer, cfg, dp_rank=r, dp_size=2, **kw)) for r in range(2)]
    plans = [MATBatchSampler(data[1], RATIOS, 4, 2, dp_rank=r, dp_size=2, seed=6, derive_views=True,
                             schedule="pt2", split=0.5, max_steps=4) for r in range(2)]
    for r in range(2):
        assert [[m for _, m in mb] for mb in got[r]] == [[v for _, v in mb] for mb in plans[r]]
    steps = [sum((got[r][k] for r in range(2)), []) for k in range(3)]  # 15 // 4 = 3 steps, 1 micro-batch each
    assert [sorted({m for _, m in s}) for s in steps] == [["V"], ["A"], ["AV"]]  # V:A 5:2 -> V, A; then AV
    assert all(len(set(s)) == 4 for s in steps)


def test_brace_pattern_over_http_reads_only_the_named_shards(media_shards, tokenizer, cfg):
    """`model.data.shards` as a URL pattern: a real HTTP server on 127.0.0.1 serves the folder."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(media_shards))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        got = [it for mb in stream(url + "/{V,AV}-{000000..000001}.tar", tokenizer, cfg, global_batch_size=8,
                                   micro_batch_size=8) for it in mb]
        named = []
        for name in ("V-000000.tar", "V-000001.tar", "AV-000000.tar", "AV-000001.tar"):
            with tarfile.open(media_shards / name) as t:
                named += [json.load(t.extractfile(m))["id"] for m in t.getmembers() if m.name.endswith(".json")]
        assert len(got) == 8 and sorted(it["id"] for it in got) == sorted(named)
        with pytest.raises(FileNotFoundError, match="1 shards .V-000009.tar. are not listed in"):
            stream(url + "/V-{000000,000009}.tar", tokenizer, cfg, global_batch_size=4, micro_batch_size=4)
    finally:
        httpd.shutdown()
