"""Modality tokens expand to the right embedding positions, filled with the right features, and
an encoder runs only for the samples whose tokens need it (paper §3.1, §3.3, Fig. 4)."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm import modality
from nemo_avllm.model.provider import build_model


@pytest.fixture(scope="module")
def model(dist1):
    from nemo_avllm import config

    torch.manual_seed(0)
    return build_model(config.load_model("tiny"))


def _media(b, layout, image_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, layout.num_frames, 3, image_size, image_size, generator=g)
    audio = 0.1 * torch.randn(b, layout.num_audio_segments, 480000, generator=g)
    return video, audio


def test_expansion_counts_and_order():
    layout = modality.TokenLayout(num_frames=32, num_patches=256, num_audio_segments=4)
    vis, aud, av = (layout.expansion(t) for t in modality.MODALITY_TOKENS)
    assert len(vis) == 32 + 256 and len(aud) == 4 and len(av) == 32 + 256 + 4
    assert vis == [modality.TEMPORAL_ID] * 32 + [modality.SPATIAL_ID] * 256
    assert aud == [modality.AUDIO_ID] * 4
    assert av == vis + aud  # [H_t; H_s; H_a]
    with pytest.raises(ValueError, match="unknown modality token"):
        layout.expansion("<IMG>")


def test_spatial_tokens_are_the_time_mean_of_patch_tokens(model):
    video, _ = _media(2, model.layout)
    e_t, e_s = model.vision(video)
    assert e_t.shape == (2, model.layout.num_frames, model.vision.width)
    assert e_s.shape == (2, model.layout.num_patches, model.vision.width)
    # per-frame patch tokens straight from open_clip, then the mean over T
    out = model.vision.visual.forward_intermediates(
        video.flatten(0, 1), indices=[model.vision.layer_index], intermediates_only=True, output_fmt="NLC",
        output_extra_tokens=True,
    )
    patches = out["image_intermediates"][0].view(2, model.layout.num_frames, model.layout.num_patches, -1)
    torch.testing.assert_close(e_s, patches.mean(dim=1))
    torch.testing.assert_close(e_t, out["image_intermediates_prefix"][0][:, 0].view(2, model.layout.num_frames, -1))
    # frames differ, so temporal tokens differ frame to frame
    assert not torch.allclose(e_t[:, 0], e_t[:, 1])


def test_feature_layer_is_the_penultimate_block(model):
    assert model.vision.layer_index == 3 - 2  # tiny ViT has 3 blocks; feature_layer = -2


def _sample(layout, tokens, text_len=3):
    ids = [1]
    for t in tokens:
        ids += list(range(10, 10 + text_len)) + layout.expansion(t)
    return ids + [20, 21]


def _pad(rows):
    n = max(map(len, rows))
    return torch.tensor([r + [0] * (n - len(r)) for r in rows])


def test_placeholders_are_filled_with_projected_features_in_order(model):
    layout = model.layout
    ids = _pad([_sample(layout, ["<AUD_VIS>", "<VIS>"]), _sample(layout, ["<AUD>"]), _sample(layout, ["<VIS>", "<AUD>"])])
    video, audio = _media(3, layout)
    feats = model.encode(ids, video, audio)
    pos = ids.clamp(min=0)
    emb = model.embed(ids, torch.arange(ids.shape[1]).expand_as(ids), feats).transpose(0, 1)  # [b, s, h]
    text = model.llm.embedding(input_ids=pos, position_ids=None).transpose(0, 1)
    h_t, h_s, h_a = model.proj_temporal(feats.temporal), model.proj_spatial(feats.spatial), model.proj_audio(feats.audio)
    for b in range(3):
        for pid, h, n in ((modality.TEMPORAL_ID, h_t, layout.num_frames), (modality.SPATIAL_ID, h_s, layout.num_patches),
                          (modality.AUDIO_ID, h_a, layout.num_audio_segments)):
            where = (ids[b] == pid).nonzero().squeeze(1)
            if len(where) == 0:
                continue
            assert len(where) % n == 0
            # each occurrence of a modality token gets the whole feature sequence, in order
            expected = h[b].repeat(len(where) // n, 1)
            torch.testing.assert_close(emb[b, where], expected)
        text_pos = (ids[b] >= 0).nonzero().squeeze(1)
        torch.testing.assert_close(emb[b, text_pos], text[b, text_pos])


class _CountingEncoder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.samples = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.samples += x.shape[0]
        return self.inner(x)


def test_encoders_run_only_for_samples_that_need_them(model):
    layout = model.layout
    vision, audio_enc = model.vision, model.audio
    model.vision, model.audio = _CountingEncoder(vision), _CountingEncoder(audio_enc)
    try:
        video, audio = _media(4, layout)
        ids = _pad([_sample(layout, ["<VIS>"]), _sample(layout, ["<AUD>"]), _sample(layout, ["<AUD_VIS>"]), [1, 30, 31, 32]])
        feats = model.encode(ids, video, audio)
        assert (model.vision.calls, model.vision.samples) == (1, 2)  # samples 0 and 2
        assert (model.audio.calls, model.audio.samples) == (1, 2)  # samples 1 and 2
        assert feats.temporal[[1, 3]].abs().sum() == 0 and feats.audio[[0, 3]].abs().sum() == 0
        # a visual-only batch never calls the audio encoder, and vice versa
        model.encode(_pad([_sample(layout, ["<VIS>"])] * 2), video[:2], None)
        assert model.audio.calls == 1 and model.vision.calls == 2
        model.encode(_pad([_sample(layout, ["<AUD>"])] * 3), None, audio[:3])
        assert model.vision.calls == 2 and (model.audio.calls, model.audio.samples) == (2, 5)
        # text-only batch: no encoder at all
        model.encode(torch.tensor([[1, 5, 6]]), None, None)
        assert model.vision.calls == 2 and model.audio.calls == 2
    finally:
        model.vision, model.audio = vision, audio_enc


def test_selected_samples_get_the_same_features_as_a_full_batch(model):
    video, audio = _media(3, model.layout)
    e_t_all, _ = model.vision(video)
    ids = _pad([_sample(model.layout, ["<AUD>"]), _sample(model.layout, ["<VIS>"]), _sample(model.layout, ["<AUD>"])])
    feats = model.encode(ids, video, audio)
    torch.testing.assert_close(feats.temporal[1], e_t_all[1])


def test_encoders_are_frozen_and_stay_in_eval_mode(model):
    model.train()
    for enc in (model.vision, model.audio):
        assert not enc.training
        assert all(not p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in model.proj_temporal.parameters())


def test_wrong_layout_is_refused(model):
    bad = modality.TokenLayout(model.layout.num_frames + 1, model.layout.num_patches, model.layout.num_audio_segments)
    ids = _pad([_sample(bad, ["<VIS>"])])
    video, _ = _media(1, model.layout)
    with pytest.raises(ValueError, match="not a multiple"):
        model(ids, video=video)


def test_missing_media_is_refused(model):
    ids = _pad([_sample(model.layout, ["<AUD>"])])
    with pytest.raises(ValueError, match="no audio"):
        model(ids, video=None, audio=None)


def test_image_is_a_one_frame_video(model):
    # an image decodes to T copies of one frame: every temporal token equal, spatial = its patches
    frame = torch.randn(1, 1, 3, 64, 64)
    e_t, e_s = model.vision(frame.expand(1, model.layout.num_frames, 3, 64, 64))
    e_t1, e_s1 = model.vision(frame)
    torch.testing.assert_close(e_t, e_t1.expand_as(e_t))
    torch.testing.assert_close(e_s, e_s1)
