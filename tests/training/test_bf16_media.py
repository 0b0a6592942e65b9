"""bf16 (the paper's training dtype) with live media: the LLM and projectors in bf16 while the
frozen encoders run in their own dtype (`model.encoder_dtype`: fp32 on CPU by default, bf16 on
GPUs), with the decoded video and audio cast to it, in training, generation and `avllm features`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nemo_avllm import config
from tests.media_factory import FFMPEG, conv, make_media_set

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from nemo_avllm.data.manifest_checks import validate_manifest

    d = make_media_set(tmp_path_factory.mktemp("bf16media"))
    lines = [
        {"id": "v", "video": "mute.mp4", "conversations": conv("<VIS> What colour?", "Red.")},
        {"id": "a", "video": "av1.mp4", "conversations": conv("<AUD> What sound?", "A low tone.")},
        {"id": "av", "video": "av2.webm", "conversations": conv("<AUD_VIS> Describe.", "A green square and a tone.")},
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    found, report = validate_manifest(d / "train.jsonl")
    assert report.ok
    return found


def _cfg(encoder_dtype: str, *more: str):
    return config.load_model("tiny", ["params_dtype=bf16", f"encoder_dtype={encoder_dtype}", *more])


@pytest.mark.parametrize("encoder_dtype,expected", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_forward_backward_with_live_video_and_audio(samples, tokenizer, dist1, encoder_dtype, expected):
    from nemo_avllm.data.collate import collate_av
    from nemo_avllm.data.dataset import AVDataset
    from nemo_avllm.model.provider import avllm_config, build_model
    from nemo_avllm.training import optim
    from nemo_avllm.training.data import decode_settings
    from nemo_avllm.training.step import forward_step

    cfg = _cfg(encoder_dtype)
    torch.manual_seed(0)
    model = build_model(cfg)
    optim.freeze_for_stage(model, ["projectors", "llm"])
    assert model.vision.dtype == model.audio.dtype == expected  # auto: fp32 on this CPU machine
    assert model.audio.htsat.logmel_extractor.melW.dtype == torch.float32  # the log-mel front end stays fp32
    assert model.proj_audio.linear.weight.dtype == model.llm.embedding.word_embeddings.weight.dtype == torch.bfloat16

    ds = AVDataset(samples, tokenizer, avllm_config(cfg).layout(), decode_settings(avllm_config(cfg)))
    batch = collate_av([ds[i] for i in range(3)], 192)
    assert batch["modality"] == ["V", "A", "AV"] and batch["video"].dtype == batch["audio"].dtype == torch.float32
    output, loss_func = forward_step(iter([batch]), model)  # the training step's micro-batch path
    loss_sum, tokens, _ = loss_func(output)
    (loss_sum / tokens).backward()
    assert torch.isfinite(loss_sum) and tokens > 0
    for name in ("proj_temporal", "proj_spatial", "proj_audio"):
        grad = getattr(model, name).linear.weight.grad
        assert grad is not None and grad.dtype == torch.bfloat16, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    # generation (greedy decoding) runs the same encoders on the same live media
    from nemo_avllm.inference.generate import greedy_generate, prompt_ids

    prompts = [prompt_ids([{"from": "human", "value": f"{tok} Describe."}], tokenizer, model.layout)
               for tok in ("<VIS>", "<AUD>", "<AUD_VIS>")]
    answers = greedy_generate(model, prompts, video=batch["video"], audio=batch["audio"], max_new_tokens=2)
    assert len(answers) == 3 and all(len(a) <= 2 for a in answers)

    # the encoders' tokens follow those of fp32 copies of the same weights (what `auto` runs on CPU)
    rows = [(model.vision, batch["video"]), (model.audio, batch["audio"][1:])]  # sample 0 has no sound
    for encoder, media in rows:
        ref = copy.deepcopy(encoder).set_dtype(torch.float32)
        for got, want in zip(_tuple(encoder(media)), _tuple(ref(media))):
            assert got.dtype == expected and want.dtype == torch.float32
            torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def test_features_in_bf16_with_audio(samples, tmp_path):
    from nemo_avllm.training.feature_cache import build_encoders, build_feature_cache, open_cache

    cfg = _cfg("bf16", "allow_random_init=true")
    vision, audio = build_encoders(cfg)
    assert vision.dtype == audio.dtype == torch.bfloat16
    report = build_feature_cache(samples, tmp_path / "cache", cfg, dtype="bf16", encoders=(vision, audio), progress=False)
    assert (report.written, report.failed) == (3, 0), report
    cache = open_cache(tmp_path / "cache", cfg)
    with_sound = [cache.get(s.media_id) for s in samples if s.media_id in cache]
    audio_rows = [f["audio"] for f in with_sound if "audio" in f]
    assert len(audio_rows) == 2  # av1.mp4 and av2.webm have sound, mute.mp4 has none
    for rows in audio_rows:
        assert rows.dtype == torch.bfloat16 and rows.shape == (2, 128) and torch.isfinite(rows.float()).all()
        assert rows.float().abs().sum() > 0
