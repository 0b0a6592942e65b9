"""Activation recompute (on by default in stage 2) gives the same loss and gradients as storing
the activations, through the real training step (AVLLM, megatron DDP, forward_step, megatron's
forward-backward schedule), with dropout on so the replayed forward must redraw the same masks."""

from __future__ import annotations

import torch

from nemo_avllm import config
from nemo_avllm.training import optim
from tests.training.deterministic_data import SyntheticData


def _loss_and_grads(recompute: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm.data.collate import collate_tokens
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training.step import forward_step

    cfg = config.load_model("tiny", [f"activations_checkpoint={str(recompute).lower()}",
                                     "llm.hidden_dropout=0.1", "llm.attention_dropout=0.1"])
    distributed.set_seed(7)  # same weights in both builds
    model = build_model(cfg)
    assert model.config.recompute_granularity == ("full" if recompute else None)
    assert model.config.hidden_dropout == model.config.attention_dropout == 0.1
    optim.freeze_for_stage(model, ["projectors", "llm"])
    ddp = optim.wrap_ddp(model, use_distributed_optimizer=False)
    model.config.calculate_per_token_loss = True
    data = SyntheticData(seq_length=64)
    items = [data.sample(i, model.layout) for i in range(3)]  # one each of <VIS>, <AUD>, <AUD_VIS>
    batch = collate_tokens([it["tokens"] for it in items], seq_length=64)
    batch["video"] = torch.stack([it["video"] for it in items])
    batch["audio"] = torch.stack([it["audio"] for it in items])
    ddp.zero_grad_buffer()
    distributed.set_seed(11)  # same dropout stream in both runs
    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp],
                                      num_microbatches=1, seq_length=64, micro_batch_size=3, forward_only=False)
    loss_sum, tokens = out[0]["lm loss"]
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss_sum / tokens), grads


def test_recompute_gives_the_same_loss_and_gradients_with_dropout(dist1):
    loss_off, grads_off = _loss_and_grads(recompute=False)
    loss_on, grads_on = _loss_and_grads(recompute=True)
    assert loss_on == loss_off
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 10
    assert any(n.startswith("llm.decoder.layers") for n in grads_on)  # the recomputed layers
    for name in grads_off:
        assert torch.equal(grads_on[name], grads_off[name]), name
