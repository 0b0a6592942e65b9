"""AVDataset + collate + DataLoader on real media, the real tokenizer and the tiny model config."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from nemo_avllm import modality
from nemo_avllm.data import decode
from nemo_avllm.data.collate import collate_av
from nemo_avllm.data.dataset import AVDataset
from nemo_avllm.data.decode import MediaSource
from nemo_avllm.data.loaders import train_loader
from nemo_avllm.data.manifest_checks import validate_manifest
from nemo_avllm.data.mat_sampler import MATBatchSampler
from nemo_avllm.data.prepare import prepare
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training.data import decode_settings, model_spec
from tests.media_factory import conv, make_media_set, FFMPEG

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")

RATIOS = {"V": 0.5, "A": 0.2, "AV": 0.3}



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest over real clips (with and without sound), a still image and a corrupt file."""
    d = tmp_path_factory.mktemp("avdata")
    make_media_set(d, 44100)
    views = {"A": conv("<AUD> What do you hear?", "A high tone plays."),
             "V": conv("<VIS> What do you see?", "The square is red.")}
    lines = [
        {"id": "v-mute", "video": "mute.mp4", "conversations": conv("<VIS> What colour is the square?", "Red.")},
        {"id": "a-av1", "video": "av1.mp4", "conversations": conv("<AUD> Describe the sound.", "A low tone.")},
        {"id": "av-av1", "video": "av1.mp4", "conversations": conv("<AUD_VIS> Is the sound synchronous?", "Yes.")},
        {"id": "v-corrupt", "video": "corrupt.mp4", "conversations": conv("<VIS> What moves?", "A circle.")},
        {"id": "v-still", "video": "still.png", "conversations": conv("<VIS> Describe the image.", "A square.")},
        {"id": "av-av2", "video": "av2.webm", "views": views,
         "conversations": conv("<VIS> What colour?", "Green.", "<AUD> And the sound?", "A high tone.")},
    ]
    lines += [dict(x, id=x["id"] + "-2") for x in lines]  # 12 samples
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, report = validate_manifest(path)
    assert report.ok and len(samples) == 12
    return d, path, samples


@pytest.fixture(scope="module")
def model_cfg():
    from nemo_avllm import config

    return config.load_model("tiny")


@pytest.fixture(scope="module")
def dataset(data, tokenizer, model_cfg):
    _, _, samples = data
    return AVDataset(samples, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg)),
                     max_length=256, derive_views=True)


def test_settings_come_from_the_model_config(model_cfg):
    s = decode_settings(avllm_config(model_cfg))
    assert (s.num_frames, s.num_audio_segments, s.image_size, s.sample_rate, s.window) == (4, 2, 64, 48000, 480000)
    assert avllm_config(model_cfg).layout() == modality.TokenLayout(4, 16, 2)


def test_items_carry_only_the_media_their_tokens_need(dataset, data):
    d = data[0]
    v, a, av = dataset[0], dataset[1], dataset[2]
    assert (v["id"], v["modality"], a["modality"], av["modality"]) == ("v-mute", "V", "A", "AV")
    assert v["video"].shape == (4, 3, 64, 64) and "audio" not in v
    assert a["audio"].shape == (2, 480000) and "video" not in a
    assert av["video"].shape == (4, 3, 64, 64) and av["audio"].shape == (2, 480000)
    ids = torch.tensor(av["tokens"].input_ids)
    assert [(ids == p).sum().item() for p in modality.PLACEHOLDER_IDS] == [4, 16, 2]
    # exactly what the media module decodes (the contract is shared with DALI)
    assert torch.equal(v["video"], decode.decode_video(d / "mute.mp4", 4, 64)[0])
    assert torch.equal(a["audio"], decode.load_audio_segments(d / "av1.mp4", 2, 48000, 480000))
    still = dataset[4]["video"]
    assert torch.equal(still[0], still[3])  # an image is a 1-frame video


def test_other_views_come_only_from_the_manifest_views(dataset, tokenizer):
    v = dataset[(5, "V")]  # the AV clip's own visual-only conversation from `views`: <VIS>, no audio decoded
    ids = torch.tensor(v["tokens"].input_ids)
    assert (ids == modality.AUDIO_ID).sum() == 0 and (ids == modality.TEMPORAL_ID).sum() == 4
    assert "audio" not in v and v["video"].shape[0] == 4
    assert "The square is red" in tokenizer.decode([t for t in v["tokens"].input_ids if t >= 0])
    a = dataset[(5, "A")]  # its own "A" conversation from `views`
    assert "hear" in tokenizer.decode([t for t in a["tokens"].input_ids if t >= 0])
    assert "video" not in a and a["audio"].shape == (2, 480000)
    with pytest.raises(KeyError, match="has no 'A' view"):
        dataset[(0, "A")]
    with pytest.raises(KeyError, match="has no 'V' view"):  # an AV answer is never reused for <VIS>
        dataset[(2, "V")]


def test_prepare_index_supplies_the_flac_side_car(data, tokenizer, model_cfg, tmp_path):
    d, path, samples = data
    prepare(path, tmp_path / "prep", num_workers=1, progress=False)
    samples_idx, report = validate_manifest(path, index=tmp_path / "prep")
    assert [s.id for s in samples_idx] == [s.id for s in samples if "corrupt" not in s.id]
    assert report.counts == {"bad_media": 2}  # prepare listed the corrupt file in bad_files.jsonl
    ds = AVDataset(samples_idx, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg)),
                   index=tmp_path / "prep")
    src = MediaSource.of(samples_idx[1], ds.index)
    assert src.audio.endswith(".flac") and src.info.num_frames == 8 and src.has_audio
    from_flac = ds[1]["audio"]
    from_container = decode.load_audio_segments(d / "av1.mp4", 2, 48000, 480000)
    assert (from_flac - from_container).abs().max() < 1e-3  # 16-bit FLAC of the same 48 kHz mono track


def test_corrupt_media_is_replaced_by_the_next_good_sample_of_the_same_view(data, tokenizer, model_cfg, caplog):
    d, _, samples = data
    ds = AVDataset(samples, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg)))
    with caplog.at_level("WARNING"):
        item = ds[3]
    assert item["id"] == "v-still" and item["modality"] == "V"  # sample 4 is the next visual-only one
    assert item["bad_media"] == [str(d / "corrupt.mp4")]
    assert sum("corrupt.mp4" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = ds[(9, "V")]  # the other sample on the same bad file: skipped without a retry or a log line
    assert again["id"] == "v-still-2" and again["bad_media"] == [str(d / "corrupt.mp4")]
    assert not caplog.records and list(ds.bad) == [samples[3].media_id]

    strict = AVDataset(samples, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg)),
                       replace_bad=False)
    assert strict[3] is None
    batch = collate_av([strict[0], strict[3]], seq_length=128)
    assert batch["input_ids"].shape == (1, 128) and batch["ids"] == ["v-mute"]


def test_collate_stacks_media_with_zero_rows(dataset):
    items = [dataset[0], dataset[1], dataset[2]]  # V, A, AV
    batch = collate_av(items, seq_length=96)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["loss_mask"].shape == (3, 96)
    assert batch["video"].shape == (3, 4, 3, 64, 64) and batch["audio"].shape == (3, 2, 480000)
    assert batch["video"][1].abs().sum() == 0 and batch["audio"][0].abs().sum() == 0
    assert torch.equal(batch["video"][2], items[2]["video"]) and torch.equal(batch["audio"][1], items[1]["audio"])
    assert modality.needs_visual(batch["input_ids"]).tolist() == [True, False, True]
    assert modality.needs_audio(batch["input_ids"]).tolist() == [False, True, True]
    assert batch["modality"] == ["V", "A", "AV"] and "features" not in batch
    only_audio = collate_av([dataset[1]], seq_length=96)
    assert "video" not in only_audio and only_audio["audio"].shape == (1, 2, 480000)


def test_dataloader_with_workers_keeps_full_micro_batches_and_exact_ratios(data, tokenizer, model_cfg):
    _, _, samples = data
    kw = dict(global_batch_size=6, micro_batch_size=3, seq_length=96, mat_ratios=RATIOS, derive_views=True, seed=1)
    loader = train_loader(model_spec(model_cfg, num_workers=2, **kw), samples, tokenizer)
    plan = [it for mb in MATBatchSampler(samples, RATIOS, 6, 3, seed=1, derive_views=True) for it in mb]
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # 12 samples // 6 = 2 global batches of 2 micro-batches
    bad = []
    for k, b in enumerate(batches):
        assert b["input_ids"].shape == (3, 96)  # never a short micro-batch (pipeline parallelism)
        bad += b["bad_media"]
        assert b["modality"] == [v for _, v in plan[3 * k : 3 * k + 3]]
    for g in range(2):
        assert Counter(sum((batches[2 * g + i]["modality"] for i in range(2)), [])) == {"V": 3, "A": 1, "AV": 2}
    assert len(bad) == sum(samples[i].id.startswith("v-corrupt") for i, _ in plan)
    assert loader.batch_sampler.state_dict() == {"consumed_samples": 12, "epoch": 1}
