"""A still image (a 1-frame video, its frame repeated T times) goes through the ViT once, not T
times, and gives the same tokens as T passes (issue 9)."""

from __future__ import annotations

import torch

from nemo_avllm import config
from nemo_avllm.model.encoders import VisionEncoder
from nemo_avllm.model.provider import avllm_config


def _reference(enc: VisionEncoder, video: torch.Tensor):
    """Every frame through the ViT (what the encoder did before): E_t, E_s."""
    b, t = video.shape[:2]
    cls, patches = enc._encode_frames(video.flatten(0, 1))
    return cls.view(b, t, -1), patches.view(b, t, patches.shape[1], -1).mean(dim=1)


def test_images_are_encoded_once_with_the_same_tokens():
    torch.manual_seed(0)
    enc = VisionEncoder(avllm_config(config.load_model("tiny")).vision).eval()
    t, s = 4, enc.image_size
    g = torch.Generator().manual_seed(1)
    clip = torch.randn(t, 3, s, s, generator=g)  # a video: T different frames
    image = torch.randn(1, 3, s, s, generator=g).expand(t, -1, -1, -1)  # an image: one frame T times
    video = torch.stack([image, clip, image.clone()])

    seen = []
    encode = enc._encode_frames
    enc._encode_frames = lambda frames: seen.append(frames.shape[0]) or encode(frames)
    e_t, e_s = enc(video)
    del enc._encode_frames
    assert seen == [1 + t + 1]  # one ViT call: 1 frame per image, T for the video (was 3 * T)

    ref_t, ref_s = _reference(enc, video)
    assert e_t.shape == (3, t, enc.width) and e_s.shape == (3, enc.num_patches, enc.width)
    torch.testing.assert_close(e_t, ref_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e_s, ref_s, rtol=1e-5, atol=1e-5)
    # the image's T temporal tokens are one token repeated
    assert torch.equal(e_t[0], e_t[0, :1].expand(t, -1))
