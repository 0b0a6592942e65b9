"""One micro-batch through the model, in the shape megatron-core's pipeline schedules expect.

`forward_step(data_iterator, model)` returns the stage's output and, on the last stage, a loss
function; `get_forward_backward_func()` then runs the micro-batches (1F1B when PP > 1)."""

from __future__ import annotations

from functools import partial

import torch

from nemo_avllm import modality
from nemo_avllm.model.avllm import EncoderFeatures
from nemo_avllm.model.loss import masked_token_loss


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's 3-tuple: (loss, number of loss tokens, values to report)."""
    loss_sum, num_tokens = masked_token_loss(output_tensor, loss_mask)
    return loss_sum, num_tokens.int(), {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}


def forward_step(data_iterator, model):
    """A micro-batch holds what this pipeline stage uses (`training.broadcast.stage_keys`): tokens
    and media on the first stage, labels and loss mask on the last, nothing in between."""
    batch = next(data_iterator) or {}
    features = batch.get("features")
    if isinstance(features, dict):
        features = EncoderFeatures(**features)
    output = model(
        input_ids=batch.get("input_ids"),
        position_ids=batch.get("position_ids"),
        labels=batch.get("labels"),
        video=batch.get("video"),
        audio=batch.get("audio"),
        features=features,
    )
    loss_mask = batch.get("loss_mask")
    if loss_mask is None and batch.get("labels") is not None:
        loss_mask = batch["labels"] != modality.IGNORE_INDEX
    return output, partial(loss_func, loss_mask)
