"""A damaged feature-cache shard (issue 24, fault 4): its clips are reported with shard and clip
and replaced like damaged media, never a crash hours in; `avllm features` verifies and repairs."""

from __future__ import annotations

import logging
import shutil

from nemo_avllm import config
from nemo_avllm.data.dataset import AVDataset
from nemo_avllm.data.features import FeatureCache
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training.data import decode_settings
from nemo_avllm.training.feature_cache import build_feature_cache, open_cache, run
from tests.data.test_features import cache_dir, cfg, data, encoders  # noqa: F401  (module fixtures)


def _damage(cache, sample):
    """Truncate the shard of `sample`'s clip, as a copy cut short would."""
    clips = FeatureCache(cache).index
    media = sample.media_id
    shard = cache / clips[media]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard, media


def test_a_damaged_entry_is_replaced_and_reported(cache_dir, data, cfg, tokenizer, tmp_path, caplog):  # noqa: F811
    from nemo_avllm.data.features import verify_cache

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    shard, media = _damage(cache, data[2][0])
    samples = data[2][:5]
    ds = AVDataset(samples, tokenizer, avllm_config(cfg).layout(), decode_settings(avllm_config(cfg)),
                   feature_cache=open_cache(cache, cfg))
    with caplog.at_level(logging.WARNING):
        item = ds[0]  # sample `av`: its tokens are in the damaged shard
    assert item["bad_media"] and item["features"]["temporal"].shape[0] > 0
    assert f"{shard}" in caplog.text and f"damaged feature-cache entry of clip {media}" in caplog.text
    assert verify_cache(cache).keys() == {shard.name}


def test_features_verify_and_repair(cache_dir, data, cfg, encoders, tmp_path, capsys):  # noqa: F811
    from nemo_avllm.data.features import verify_cache

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    shard, _ = _damage(cache, data[2][0])
    args = config.load("features", ["model=tiny", "model.allow_random_init=true", f"source={data[1]}",
                                    f"out_dir={cache}", "verify=true"])
    assert run(args) == 1
    assert f"damaged: {shard}" in capsys.readouterr().out
    # repair: what `avllm features repair=true` does, with the test's encoders (weights are random)
    shard.rename(shard.with_name(shard.name + ".damaged"))
    build_feature_cache(data[2], cache, cfg, encoders=encoders, clips_per_shard=2, progress=False)
    assert verify_cache(cache) == {}
    args.verify = True
    assert run(args) == 0
