"""Projectors under megatron's DDP and initialisation: every projector takes part in every
micro-batch's backward whatever its modality mix, and the initial weights do not depend on the
initialisation path (the TP=2 case is in tests/distributed/test_tensor_parallel_data.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nemo_avllm import modality


def test_a_micro_batch_without_a_modality_still_gives_every_projector_a_zero_gradient(dist1, tiny_cfg):
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training.synthetic_batches import synthetic_batches

    tiny_cfg.build_encoders = False
    model = build_model(tiny_cfg)
    batch = synthetic_batches(model, 1, 2, 96, torch.device("cpu"), encoders=False, dtype=torch.float32)[0]
    ids = batch["input_ids"]
    ids[ids == modality.AUDIO_ID] = 5  # <VIS> samples only: no audio position in the micro-batch
    kwargs = dict(input_ids=ids, features=_features(batch), labels=batch["labels"])
    loss = model(**kwargs)
    (loss * batch["loss_mask"]).sum().backward()
    for name in ("proj_temporal", "proj_spatial", "proj_audio"):
        for p in getattr(model, name).parameters():
            assert p.grad is not None, name  # megatron's DDP hooks fire for it
    assert all(float(p.grad.abs().max()) == 0 for p in model.proj_audio.parameters())
    assert float(model.proj_temporal.linear.weight.grad.abs().max()) > 0
    # contributing exactly nothing: the loss equals the one without the audio projector applied
    with torch.no_grad():
        model.proj_audio.linear.bias.fill_(1e4)
        assert torch.equal(model(**kwargs), loss.detach())


def test_initial_weights_do_not_depend_on_cpu_or_gpu_initialisation(dist1, tiny_cfg):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from nemo_avllm.model.projector import Projector
    from nemo_avllm.model.provider import megatron_config

    weights = {}
    for cpu_init in (True, False):
        config = megatron_config(tiny_cfg)
        config.use_cpu_initialization = cpu_init
        torch.manual_seed(3)
        weights[cpu_init] = Projector(24, 64, config).linear.weight.detach().clone()
    assert torch.equal(weights[True], weights[False])
    # megatron's own CPU initialisation of the same layer: CPU runs keep their weights
    config = megatron_config(tiny_cfg)
    config.use_cpu_initialization = True
    torch.manual_seed(3)
    ref = ColumnParallelLinear(24, 64, config=config, init_method=nn.init.xavier_uniform_, bias=True, gather_output=True)
    assert torch.equal(weights[True], ref.weight.detach())


def _features(batch):
    from nemo_avllm.model.avllm import EncoderFeatures

    return EncoderFeatures(**batch["features"])
