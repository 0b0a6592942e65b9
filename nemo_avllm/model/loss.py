"""Paper Eq. 6: cross-entropy on assistant response tokens only."""

from __future__ import annotations

import torch


def masked_tokens(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The per-token losses (float32) where `loss_mask` is set, zero elsewhere: the one rule of
    which tokens count, shared by the training loss and the per-group validation loss."""
    return per_token_loss.float() * loss_mask.float()


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-token losses where `loss_mask` is set, and the number of such tokens.

    Returned as (sum, count) so that micro-batches and data-parallel ranks can be averaged per
    token, not per sample."""
    mask = loss_mask.to(per_token_loss.dtype)
    return masked_tokens(per_token_loss, mask).sum(), mask.sum().float()
