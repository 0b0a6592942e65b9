"""Initial weights: random frozen encoders follow their config's seed; projectors can start on
standardised encoder outputs."""

from __future__ import annotations

import torch

from nemo_avllm.model.encoders import AudioEncoder, AudioEncoderConfig, VisionEncoder, VisionEncoderConfig


def _weights(module) -> torch.Tensor:
    return torch.cat([p.flatten() for p in module.parameters()])


def test_random_encoders_follow_init_seed_and_leave_the_callers_rng_alone(tiny_cfg):
    from nemo_avllm.model.provider import avllm_config

    cfg = avllm_config(tiny_cfg)
    for make, enc_cfg in ((VisionEncoder, cfg.vision), (AudioEncoder, cfg.audio)):
        torch.manual_seed(123)
        a = _weights(make(enc_cfg))
        after = torch.rand(3)
        torch.manual_seed(999)
        b = _weights(make(enc_cfg))
        assert torch.equal(a, b)  # same config, same encoder, whatever the global RNG holds
        torch.manual_seed(123)
        assert torch.equal(torch.rand(3), after)  # building it drew nothing from the caller's RNG
        other = type(enc_cfg)(**{**enc_cfg.__dict__, "init_seed": enc_cfg.init_seed + 1})
        assert not torch.equal(a, _weights(make(other)))
    assert isinstance(cfg.vision, VisionEncoderConfig) and isinstance(cfg.audio, AudioEncoderConfig)


def test_projector_standardize_inputs_maps_standardised_features_through_the_initial_weights(dist1, tiny_cfg):
    from nemo_avllm.model.projector import Projector
    from nemo_avllm.model.provider import megatron_config

    torch.manual_seed(0)
    proj = Projector(12, 8, megatron_config(tiny_cfg))
    with torch.no_grad():
        proj.linear.bias.normal_()
    w0, b0 = proj.linear.weight.clone(), proj.linear.bias.clone()
    x = torch.randn(5, 12) * torch.linspace(0.1, 3, 12) + 7.0  # a large shared offset, uneven spreads
    mean, std = x.mean(0), x.std(0, unbiased=False)
    proj.standardize_inputs(mean, std)
    torch.testing.assert_close(proj(x), ((x - mean) / std) @ w0.T + b0, rtol=1e-4, atol=1e-4)
    # a near-constant dimension is not blown up: its std is floored at 1% of the mean std
    proj2 = Projector(12, 8, megatron_config(tiny_cfg))
    std2 = std.clone()
    std2[0] = 0.0
    w = proj2.linear.weight.clone()
    proj2.standardize_inputs(mean, std2)
    torch.testing.assert_close(proj2.linear.weight[:, 0], w[:, 0] / (0.01 * float(std2.mean())))
