"""The frozen encoders load every public format and compute the same features.

Vision: an open_clip CLIP state dict (`visual.*` next to a text tower) and HF
`CLIPVisionModel[WithProjection]` folders built by transformers from a tiny `CLIPVisionConfig`.
Audio: a laion_clap 630k-audioset layout (`module.audio_branch.*`) and an HF `ClapAudioModel`
folder built from a tiny `ClapAudioConfig`. Features are compared with what the source model
itself computes; the name mappings round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm.hf import encoders_bridge
from nemo_avllm.model.encoders import weights
from nemo_avllm.hf.hf_model import LogMel
from tests.hf.worker import tiny_cfg

TOL = 1e-5


@pytest.fixture(scope="module")
def section():
    from nemo_avllm.model.provider import avllm_config

    return avllm_config(tiny_cfg())


def _close(a, b):
    diff = (a - b).abs().max().item()
    return diff, diff <= TOL * max(1.0, b.abs().max().item())


# ---- vision --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video(section):
    return torch.randn(2, 3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _vision(section, checkpoint=None):
    from dataclasses import replace

    from nemo_avllm.model.encoders import VisionEncoder

    torch.manual_seed(11)
    return VisionEncoder(replace(section.vision, checkpoint=str(checkpoint) if checkpoint else None))


def test_open_clip_checkpoint_loads(tmp_path, section, video):
    src = _vision(section)
    full = {f"visual.{k}": v for k, v in src.visual.state_dict().items()}
    full.update({"token_embedding.weight": torch.zeros(8, 4), "logit_scale": torch.tensor(1.0)})  # text tower
    torch.save(full, tmp_path / "open_clip.pt")
    got = _vision(section, tmp_path / "open_clip.pt")(video)
    want = src(video)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("with_projection", [True, False], ids=["CLIPVisionModelWithProjection", "CLIPVisionModel"])
def test_hf_clip_folder_loads_and_matches_hf(tmp_path, section, video, with_projection):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    cfg = encoders_bridge.clip_vision_config(section.vision)
    torch.manual_seed(5)
    hf = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    enc = _vision(section, tmp_path / "hf")
    e_t, e_s = enc(video)
    with torch.no_grad():
        hs = hf(pixel_values=video.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    want_t = hs[:, 0].reshape(2, 3, -1)
    want_s = hs[:, 1:].reshape(2, 3, enc.num_patches, -1).mean(1)
    (dt, ok_t), (ds, ok_s) = _close(e_t, want_t), _close(e_s, want_s)
    print(f"HF CLIP ({'with' if with_projection else 'no'} projection) -> open_clip: max diff temporal {dt:.1e}, spatial {ds:.1e}")
    assert ok_t and ok_s
    if with_projection:  # visual_projection.weight is proj transposed
        assert torch.equal(enc.visual.proj, hf.visual_projection.weight.t())


def test_clip_name_mapping_round_trips(section):
    sd = _vision(section).visual.state_dict()
    hf = encoders_bridge.open_clip_to_hf(sd)
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(encoders_bridge.clip_vision_config(section.vision))
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    back = weights.hf_to_open_clip(hf)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ---- audio ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audio():
    return 0.1 * torch.randn(1, 2, 480000, generator=torch.Generator().manual_seed(1))


def _audio(section, checkpoint=None):
    from dataclasses import replace

    from nemo_avllm.model.encoders import AudioEncoder

    torch.manual_seed(13)
    return AudioEncoder(replace(section.audio, checkpoint=str(checkpoint) if checkpoint else None))


def test_laion_clap_checkpoint_loads(tmp_path, section, audio):
    src = _audio(section)
    with torch.no_grad():  # non-default BatchNorm statistics, so bn0 is really mapped
        src.htsat.bn0.running_mean.normal_(0, 1)
        src.htsat.bn0.running_var.uniform_(0.5, 2)
    ckpt = {f"module.audio_branch.{k}": v for k, v in src.htsat.state_dict().items()}
    ckpt.update({"module.text_branch.embeddings.word_embeddings.weight": torch.zeros(4, 4),
                 "module.logit_scale_a": torch.tensor(1.0)})
    torch.save({"state_dict": ckpt, "epoch": 45}, tmp_path / "630k-audioset-best.pt")
    assert torch.equal(_audio(section, tmp_path / "630k-audioset-best.pt")(audio), src(audio))


def test_log_mel_front_end_matches_laion(section, audio):
    """The HF model's torch log-mel equals laion's torchlibrosa front end (what HTSAT eats)."""
    src = _audio(section)
    wav = audio[0]
    with torch.no_grad():
        want = src.htsat.logmel_extractor(src.htsat.spectrogram_extractor(wav))
    a = section.audio
    got = LogMel(a.sample_rate, a.window_size, a.hop_size, a.mel_bins, a.fmin, a.fmax)(wav)
    diff, _ = _close(got, want)
    print(f"log-mel: max |torch.stft - torchlibrosa| = {diff:.1e} dB (values down to {want.min():.0f} dB)")
    assert got.shape == want.shape and diff < 1e-3


def test_hf_clap_folder_loads_and_matches_hf(tmp_path, section, audio):
    from transformers import ClapAudioModel

    torch.manual_seed(7)
    hf = ClapAudioModel(encoders_bridge.clap_audio_config(section.audio)).eval()
    with torch.no_grad():
        hf.audio_encoder.batch_norm.running_mean.normal_(0, 1)
    hf.save_pretrained(tmp_path / "hf")
    enc = _audio(section, tmp_path / "hf")
    got = enc(audio)
    a = section.audio
    mel = LogMel(a.sample_rate, a.window_size, a.hop_size, a.mel_bins, a.fmin, a.fmax)(audio[0])
    with torch.no_grad():
        want = hf(input_features=mel).pooler_output.unsqueeze(0)
    diff, ok = _close(got, want)
    print(f"HF CLAP -> laion HTSAT: max |diff| = {diff:.1e} (features up to {want.abs().max():.2f})")
    assert ok


def test_clap_name_mapping_round_trips(section):
    sd = _audio(section).htsat.state_dict()
    hf = encoders_bridge.laion_to_hf(sd)
    from transformers import ClapAudioModel

    missing, unexpected = ClapAudioModel(encoders_bridge.clap_audio_config(section.audio)).load_state_dict(hf, strict=False)
    assert not missing and not unexpected
    back = weights.hf_to_laion(hf)
    kept = {k: v for k, v in sd.items() if not k.startswith(weights.HTSAT_NOT_IN_HF)}
    assert back.keys() == kept.keys() and all(torch.equal(back[k], kept[k]) for k in kept)
