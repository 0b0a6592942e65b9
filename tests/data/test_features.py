"""The frozen-encoder feature cache: round trip equals running the encoders, stale caches are
refused, runs resume and report bad files, and training from the cache gives the same loss."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.data.collate import collate_av
from nemo_avllm.data.dataset import AVDataset
from nemo_avllm.data.decode import MediaSource, load_media
from nemo_avllm.data.features import FeatureCache, FeatureCacheError, META_NAME
from nemo_avllm.data.manifest_checks import validate_manifest
from nemo_avllm.media import backend_label
from nemo_avllm.data.prepare import prepare
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training.data import decode_settings
from nemo_avllm.training.feature_cache import build_encoders, build_feature_cache, open_cache
from tests.media_factory import conv, make_media_set, FFMPEG, make_clip

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")



@pytest.fixture(scope="module")
def cfg():
    return config.load_model("tiny", ["allow_random_init=true"])  # tiny encoders: no pretrained weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("featdata")
    make_media_set(d)
    lines = [
        {"id": "av", "video": "av1.mp4", "conversations": conv("<AUD_VIS> Describe.", "A red square and a tone.")},
        {"id": "a", "video": "av1.mp4", "conversations": conv("<AUD> What sound?", "A low tone.")},  # same clip
        {"id": "v", "video": "mute.mp4", "conversations": conv("<VIS> What colour?", "Red.")},
        {"id": "img", "video": "still.png", "conversations": conv("<VIS> Describe the image.", "A square.")},
        {"id": "av2", "video": "av2.webm", "conversations": conv("<VIS> Colour?", "Green.", "<AUD> Sound?", "High.")},
        {"id": "bad", "video": "corrupt.mp4", "conversations": conv("<VIS> What moves?", "A circle.")},
    ]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, report = validate_manifest(path)
    assert report.ok
    return d, path, samples


@pytest.fixture(scope="module")
def encoders(cfg):
    torch.manual_seed(0)
    return build_encoders(cfg, "cpu")


@pytest.fixture(scope="module")
def cache_dir(data, cfg, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    report = build_feature_cache(data[2], out, cfg, encoders=encoders, clips_per_shard=2, batch_size=3,
                                 progress=False)
    assert (report.total, report.written, report.skipped, report.failed, report.shards) == (5, 4, 0, 1, 2)
    return out


def test_cache_round_trip_equals_running_the_encoders(data, cfg, encoders, cache_dir):
    _, _, samples = data
    vision, audio = encoders
    cache = open_cache(cache_dir, cfg)
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["dtype"] == "bf16" and len(meta["hash"]) == 16
    assert {k: meta["fields"][k] for k in ("num_frames", "num_audio_segments", "image_size", "num_patches",
                                            "feature_layer", "sample_rate", "window")} == {
        "num_frames": 4, "num_audio_segments": 2, "image_size": 64, "num_patches": 16, "feature_layer": -2,
        "sample_rate": 48000, "window": 480000}
    assert len(cache) == 4 and samples[5].media_id not in cache  # the corrupt clip is reported, not cached
    settings = decode_settings(avllm_config(cfg))
    for s in samples[:5]:
        got = cache.get(s.media_id)
        v, a = load_media(MediaSource.of(s), settings, video=True, audio=bool(s.has_audio))
        e_t, e_s = vision(v.unsqueeze(0))
        assert got["temporal"].dtype == torch.bfloat16 and got["temporal"].shape == (4, 32)
        assert got["spatial"].shape == (16, 32)
        torch.testing.assert_close(got["temporal"].float(), e_t[0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got["spatial"].float(), e_s[0], rtol=1e-2, atol=1e-2)
        if a is None:
            assert "audio" not in got  # clips without sound have no audio tokens
        else:
            assert got["audio"].shape == (2, 128)
            torch.testing.assert_close(got["audio"].float(), audio(a.unsqueeze(0))[0], rtol=1e-2, atol=1e-2)
    bad = [json.loads(x) for x in (cache_dir / "bad_files.jsonl").read_text().splitlines()]
    assert [b["path"] for b in bad] == [samples[5].video] and "cannot decode" in bad[0]["reason"]


@pytest.mark.parametrize("override,words", [
    ("num_frames=8", "num_frames: cache 4, model 8"),
    ("num_audio_segments=4", "num_audio_segments: cache 2, model 4"),
    ("vision.feature_layer=-1", "feature_layer: cache -2, model -1"),
    ("audio.clip_samples=240000", "window: cache 480000, model 240000"),
    ("vision.model_config.vision_cfg.layers=4", "vision.model_config.vision_cfg.layers: cache 3, model 4"),
    ("audio.embed_dim=32", "audio_width: cache 128, model 256"),
])
def test_cache_built_for_another_config_is_refused(cache_dir, override, words):
    other = config.load_model("tiny", [override])
    with pytest.raises(FeatureCacheError) as e:
        open_cache(cache_dir, other)
    msg = str(e.value)
    assert words in msg and str(cache_dir) in msg and "avllm features" in msg and "data.feature_cache" in msg


def test_writing_into_a_cache_of_another_config_is_refused(data, cache_dir):
    with pytest.raises(FeatureCacheError, match="another config"):
        build_feature_cache(data[2], cache_dir, config.load_model("tiny", ["num_frames=8"]), progress=False)


def test_a_cache_holds_one_decode_backend(data, cfg, cache_dir):
    pytest.importorskip("nvidia.dali", reason="needs nvidia-dali for a second back-end")
    assert json.loads((cache_dir / META_NAME).read_text())["decode_backend"] == backend_label("auto")
    other = "dali" if backend_label("auto") == "cpu" else "cpu"
    with pytest.raises(FeatureCacheError, match="decoded with back-end .* one cache holds one back-end"):
        build_feature_cache(data[2], cache_dir, cfg, backend=other, progress=False)


def test_resume_skips_done_clips_and_does_not_retry_bad_ones(data, cfg, encoders, tmp_path):
    d, path, samples = data
    out = tmp_path / "cache"
    first = build_feature_cache(samples[:3], out, cfg, encoders=encoders, clips_per_shard=1, progress=False)
    assert (first.total, first.written, first.shards) == (2, 2, 2)
    with pytest.raises(FeatureCacheError, match="unfinished"):  # as if killed before the index was written
        (out / "clips.json").unlink()
        open_cache(out, cfg)
    second = build_feature_cache(path, out, cfg, encoders=encoders, clips_per_shard=1, progress=False)
    assert (second.total, second.written, second.skipped, second.failed, second.shards) == (5, 2, 2, 1, 4)
    third = build_feature_cache(path, out, cfg, encoders=encoders, progress=False)
    assert (third.written, third.skipped, third.failed) == (0, 5, 1)
    assert len(open_cache(out, cfg)) == 4
    # an evaluation manifest (questions without answers) is a source too: only its media matter
    make_clip(d / "held_out.mp4", num_frames=4)
    (d / "eval.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "video": v, "conversations": [
        {"from": "human", "value": "<VIS> What colour?"}]}) + "\n" for i, v in enumerate(["mute.mp4", "held_out.mp4"])))
    fourth = build_feature_cache([path, d / "eval.jsonl"], out, cfg, encoders=encoders, progress=False)
    assert (fourth.total, fourth.written, fourth.skipped) == (6, 1, 5)
    from nemo_avllm.data.manifest import stable_id

    assert stable_id(str(d / "held_out.mp4"), None) in open_cache(out, cfg)
    # a prepare index is a source too: its clips, with the FLAC side-car as audio
    prepare(path, tmp_path / "prep", num_workers=1, progress=False)
    from_index = build_feature_cache(tmp_path / "prep", tmp_path / "cache2", cfg, index=tmp_path / "prep",
                                     encoders=encoders, progress=False)
    assert (from_index.total, from_index.written, from_index.failed) == (4, 4, 0)
    c1, c2 = open_cache(out, cfg), open_cache(tmp_path / "cache2", cfg)
    torch.testing.assert_close(c2.get(samples[0].media_id)["audio"].float(), c1.get(samples[0].media_id)["audio"].float(),
                               rtol=2e-2, atol=2e-2)


def test_training_from_the_cache_gives_the_loss_of_running_the_encoders(data, cfg, tokenizer, dist1, tmp_path):
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training.step import forward_step

    _, _, samples = data
    torch.manual_seed(0)
    model = build_model(cfg)
    build_feature_cache(samples, tmp_path / "cache", cfg, encoders=(model.vision, model.audio), progress=False)
    layout, settings = avllm_config(cfg).layout(), decode_settings(avllm_config(cfg))
    cache = open_cache(tmp_path / "cache", cfg)
    good = samples[:5]
    from_cache = collate_av([AVDataset(good, tokenizer, layout, settings, feature_cache=cache)[i] for i in range(5)], 128)
    decoded = collate_av([AVDataset(good, tokenizer, layout, settings)[i] for i in range(5)], 128)

    feats = from_cache["features"]
    assert "video" not in from_cache and "audio" not in from_cache
    assert feats["temporal"].shape == (5, 4, 32) and feats["spatial"].shape == (5, 16, 32)
    assert feats["audio"].shape == (5, 2, 128)
    assert feats["audio"][2].abs().sum() == 0 and feats["temporal"][1].abs().sum() == 0  # unused rows are zeros
    assert torch.equal(from_cache["input_ids"], decoded["input_ids"])

    def loss(batch):
        out, loss_fn = forward_step(iter([batch]), model)
        total, n, _ = loss_fn(out)
        return total / n

    with torch.no_grad():
        a, b = loss(from_cache), loss(decoded)
    assert torch.isfinite(a) and abs(a - b) / b < 1e-2

    with pytest.raises(FeatureCacheError, match="T, N, K"):
        from nemo_avllm.modality import TokenLayout

        AVDataset(good, tokenizer, TokenLayout(8, 16, 2), settings, feature_cache=cache)


def test_feature_stats_are_mean_and_std_over_every_cached_token(cache_dir):
    """What `projector_init=feature_stats` folds into the projectors."""
    from nemo_avllm.training.lightning_module import feature_stats

    cache = FeatureCache(cache_dir)
    stats = feature_stats(cache)
    for kind in ("temporal", "spatial", "audio"):
        rows = torch.cat([cache.get(m)[kind].double().reshape(-1, cache.get(m)[kind].shape[-1])
                          for m in sorted(cache.index) if kind in cache.get(m)])
        mean, std = stats[kind]
        torch.testing.assert_close(mean, rows.mean(0).float())
        torch.testing.assert_close(std, rows.std(0, unbiased=False).float())
    one = sorted(cache.index)[0]
    torch.testing.assert_close(feature_stats(cache, [one, "not-cached"])["spatial"][0],
                               cache.get(one)["spatial"].float().mean(0))
