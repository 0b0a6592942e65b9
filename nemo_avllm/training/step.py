"""One micro-batch through the model, in the shape megatron-core's pipeline schedules expect.

`forward_step(data_iterator, model)` returns the stage's output and, on the last stage, a loss
function; `get_forward_backward_func()` then runs the micro-batches (1F1B when PP > 1).
`validation_forward_step` is the same forward with a loss function that reports the loss per
modality group of the rows (validation)."""

from __future__ import annotations

from functools import partial

import torch

from nemo_avllm import modality
from nemo_avllm.data.packing import PackedRows
from nemo_avllm.model.avllm import EncoderFeatures
from nemo_avllm.model.loss import masked_token_loss, masked_tokens


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's 3-tuple: (loss, number of loss tokens, values to report)."""
    loss_sum, num_tokens = masked_token_loss(output_tensor, loss_mask)
    return loss_sum, num_tokens.int(), {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}


# validation groups, by the modality tokens of a row; "T" = text only
GROUPS = ("T", "V", "A", "AV")


def row_groups(input_ids: torch.Tensor) -> torch.Tensor:
    """Index into GROUPS of every row [B]."""
    vis, aud = modality.needs_visual(input_ids).long(), modality.needs_audio(input_ids).long()
    return vis + 2 * aud


def token_groups(batch: dict) -> torch.Tensor:
    """Index into GROUPS of every loss position [B, S], by the sample it belongs to: a packed row
    holds samples of several groups (`sample_of_token`), an unpacked row is one sample."""
    groups = row_groups(batch["input_ids"])
    owner = batch.get("sample_of_token")
    if owner is None:
        return groups.unsqueeze(1).expand_as(batch["loss_mask"])
    return groups[owner.clamp(min=0)]


def validation_targets(batch: dict, real: int) -> dict:
    """An evaluation micro-batch (packed or not) with the loss groups set and the repeated
    samples that pad the last one (`EvalBatchSampler`: samples `real` and after) masked out."""
    owner = batch.get("sample_of_token")
    if owner is None:
        batch["loss_mask"][real:] = False
    else:
        fake = batch["item_order"] >= real  # per sample of the packed micro-batch
        batch["loss_mask"] &= (owner >= 0) & ~fake[owner.clamp(min=0)]
    batch["groups"] = token_groups(batch)  # the last stage has no input_ids
    return batch


def group_loss_func(loss_mask: torch.Tensor, groups: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's 3-tuple with per-group sums: "groups" is [len(GROUPS), 2] = (loss sum, tokens).
    `groups` [B, S]: the group of every position's sample."""
    per_token = torch.stack([masked_tokens(output_tensor, loss_mask).flatten(), loss_mask.float().flatten()],
                            dim=-1)  # [B*S, 2]
    sums = torch.zeros(len(GROUPS), 2, dtype=per_token.dtype, device=per_token.device)
    sums.index_add_(0, groups.to(per_token.device).flatten(), per_token.detach())
    total = per_token.sum(0)
    return total[0], total[1].int(), {"groups": sums}


def forward_step(data_iterator, model):
    output, batch, loss_mask = _forward(data_iterator, model)
    return output, partial(loss_func, loss_mask)


def validation_forward_step(data_iterator, model):
    output, batch, loss_mask = _forward(data_iterator, model)
    return output, partial(group_loss_func, loss_mask, batch["groups"])


def _forward(data_iterator, model):
    """A micro-batch holds what this pipeline stage uses (`training.broadcast.stage_keys`): tokens
    and media on the first stage, labels and loss mask on the last, nothing in between (but
    the packed layout, `data.packing.PackedRows`, which every stage's attention needs)."""
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
        packed=PackedRows.from_batch(batch),
    )
    loss_mask = batch.get("loss_mask")
    if loss_mask is None and batch.get("labels") is not None:
        loss_mask = batch["labels"] != modality.IGNORE_INDEX
    return output, batch, loss_mask
