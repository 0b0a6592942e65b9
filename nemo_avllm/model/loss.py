"""Paper Eq. 6: cross-entropy on assistant response tokens only."""

from __future__ import annotations

import torch


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-token losses where `loss_mask` is set, and the number of such tokens.

    Returned as (sum, count) so that micro-batches and data-parallel ranks can be averaged per
    token, not per sample."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss.float() * mask.float()).sum(), mask.sum().float()
