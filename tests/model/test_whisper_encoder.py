"""The Whisper audio encoder (paper Table 7), built from a tiny config with random weights:
K tokens per clip from a real ffmpeg clip, numerically transformers' WhisperFeatureExtractor +
WhisperEncoder + mean pooling; HF Whisper checkpoints load strictly; the dtype and the feature
cache keep HTSAT and Whisper apart."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nemo_avllm import config
from nemo_avllm.model.encoders import WhisperAudioEncoder, build_audio_encoder
from nemo_avllm.model.provider import avllm_config
from tests.media_factory import FFMPEG, make_clip, tone

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to make test media")

K = 3


@pytest.fixture(scope="module")
def model_cfg():
    return config.load_model("tiny", ["audio=whisper_test", f"num_audio_segments={K}", "allow_random_init=true"])


@pytest.fixture(scope="module")
def section(model_cfg):
    return avllm_config(model_cfg)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An H.264 + AAC (48 kHz) clip: 1.5 s of silence then 1.5 s of a 440 Hz tone."""
    d = tmp_path_factory.mktemp("whisper_clip")
    wave = np.concatenate([np.zeros((72000, 1), np.float32), tone(1.5, 48000, 440)])
    return make_clip(d / "clip.mp4", num_frames=30, fps=10, audio=wave)


@pytest.fixture(scope="module")
def clip_audio(model_cfg, clip):
    """[K, 32000] at 16 kHz: the first and last segments hold different sound."""
    from nemo_avllm.data.decode import MediaSource, load_media
    from nemo_avllm.training.data import decode_settings

    path = clip
    settings = decode_settings(avllm_config(model_cfg))
    assert (settings.sample_rate, settings.window) == (16000, 32000)  # the data pipeline follows model.audio
    _, audio = load_media(MediaSource(str(path), str(path), str(path), True), settings, video=False, audio=True)
    return audio


def _hf_reference(enc: WhisperAudioEncoder, audio: torch.Tensor) -> torch.Tensor:
    """What plain transformers gives: WhisperFeatureExtractor (NumPy) -> the same WhisperEncoder
    weights -> mean over positions."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    hf = WhisperEncoder(enc.cfg.hf_config()).eval()
    hf.load_state_dict(enc.public_state_dict(), strict=True)
    fe = WhisperFeatureExtractor(feature_size=hf.config.num_mel_bins, sampling_rate=16000,
                                 chunk_length=enc.cfg.clip_samples // 16000)
    mel = fe(list(audio.numpy()), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        return hf(input_features=mel).last_hidden_state.mean(dim=1)


def test_k_tokens_per_clip_equal_to_plain_transformers(section, clip_audio):
    enc = build_audio_encoder(section.audio)
    assert isinstance(enc, WhisperAudioEncoder) and enc.width == section.audio.width == 32
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training  # frozen
    assert clip_audio.shape == (K, 32000)
    tokens = enc(clip_audio.unsqueeze(0))
    assert tokens.shape == (1, K, 32)
    torch.testing.assert_close(tokens[0], _hf_reference(enc, clip_audio), rtol=1e-5, atol=1e-5)
    assert (tokens[0, 0] - tokens[0, -1]).abs().max() > 1e-3  # silence and tone give different tokens


def test_encoder_dtype_is_respected_and_the_front_end_stays_fp32(section, clip_audio):
    enc = build_audio_encoder(section.audio).set_dtype(torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.frontend.mel.dtype == torch.float32
    out = enc(clip_audio.unsqueeze(0))
    ref = build_audio_encoder(section.audio)(clip_audio.unsqueeze(0))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("layout", ["WhisperModel", "WhisperForConditionalGeneration", "WhisperEncoder"])
def test_whisper_saved_by_transformers_loads_strictly(section, tmp_path, layout):
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cls = WhisperEncoder if layout == "WhisperEncoder" else getattr(transformers, layout)
    torch.manual_seed(3)
    hf = cls(section.audio.hf_config()).eval()
    hf.save_pretrained(tmp_path / "whisper")
    enc = build_audio_encoder(replace(section.audio, checkpoint=str(tmp_path / "whisper")))
    want = (hf if layout == "WhisperEncoder" else hf.get_encoder()).state_dict()
    got = enc.public_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_of_another_size_is_refused_naming_the_config(section, tmp_path):
    from transformers import WhisperModel

    WhisperModel(replace(section.audio, d_model=48).hf_config()).save_pretrained(tmp_path / "w48")
    with pytest.raises(ValueError, match=r"does not match Whisper-tiny.*shapes.*whisper_tiny, whisper_base"):
        build_audio_encoder(replace(section.audio, checkpoint=str(tmp_path / "w48")))
    torch.save({"module.audio_branch.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "clap.pt")
    with pytest.raises(ValueError, match="holds no Whisper encoder tensors"):
        build_audio_encoder(replace(section.audio, checkpoint=str(tmp_path / "clap.pt")))


def test_real_sizes_and_window_check():
    tiny = avllm_config(config.load_model("tiny", ["audio=whisper_tiny"])).audio
    base = avllm_config(config.load_model("tiny", ["audio=whisper_base"])).audio
    assert (tiny.width, tiny.arch()["encoder_layers"], base.width, base.arch()["encoder_layers"]) == (384, 4, 512, 6)
    assert tiny.clip_samples == 480000 and tiny.sample_rate == 16000
    with pytest.raises(ValueError, match=r"clip_samples=240000 does not fit max_source_positions=1500.*480000"):
        replace(tiny, clip_samples=240000).check()


def test_feature_caches_of_htsat_and_whisper_are_never_mixed(model_cfg):
    from nemo_avllm.data.features import FeatureCacheError, check_meta, fields_hash
    from nemo_avllm.training.feature_cache import model_fields

    htsat = model_fields(config.load_model("tiny", ["allow_random_init=true"]))
    whisper = model_fields(model_cfg)
    assert "audio_encoder" not in htsat and whisper["audio_encoder"] == "whisper"  # HTSAT caches keep their hash
    for cache, model, words in ((htsat, whisper, "audio_encoder: cache 'htsat', model 'whisper'"),
                                (whisper, htsat, "audio_encoder: cache 'whisper', model 'htsat'")):
        with pytest.raises(FeatureCacheError, match=words):
            check_meta({"hash": fields_hash(cache), "fields": cache}, model, "feature cache X")


def test_training_step_with_the_live_whisper_encoder(model_cfg, clip, tokenizer, dist1, tmp_path):
    """The training step's micro-batch path on decoded media: Whisper runs frozen inside the
    model (no feature cache), the audio projector gets gradients, the encoder none."""
    import json

    from nemo_avllm.data.collate import collate_av
    from nemo_avllm.data.dataset import AVDataset
    from nemo_avllm.data.manifest_checks import validate_manifest
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import optim
    from nemo_avllm.training.data import decode_settings
    from nemo_avllm.training.step import forward_step
    from tests.media_factory import conv

    lines = [{"id": "a", "video": str(clip), "conversations": conv("<AUD> What sound?", "A tone after silence.")},
             {"id": "av", "video": str(clip), "conversations": conv("<AUD_VIS> Describe.", "A red frame and a tone.")}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, report = validate_manifest(tmp_path / "train.jsonl")
    assert report.ok
    torch.manual_seed(0)
    model = build_model(model_cfg)
    optim.freeze_for_stage(model, ["projectors"])
    ds = AVDataset(samples, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg)))
    batch = collate_av([ds[0], ds[1]], 128)
    assert tuple(batch["audio"].shape) == (2, K, 32000)
    output, loss_func = forward_step(iter([batch]), model)
    loss_sum, tokens, _ = loss_func(output)
    (loss_sum / tokens).backward()
    assert torch.isfinite(loss_sum) and tokens > 0
    grad = model.proj_audio.linear.weight.grad
    assert grad is not None and grad.shape[1] == 32 and grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.audio.parameters())
