"""Modality tokens and their placeholder ids: the one definition shared by data and model.

A conversation names a modality with a text token (`<VIS>`, `<AUD>`, `<AUD_VIS>`). The data
pipeline replaces each such token by a run of placeholder ids, one per embedding position
(paper Fig. 4): `<VIS>` -> T temporal + N spatial, `<AUD>` -> K audio, `<AUD_VIS>` -> T + N + K.
The model overwrites exactly those positions with the projected encoder outputs. Placeholder ids
are negative so that they can never collide with a vocabulary id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VIS_TOKEN = "<VIS>"
AUD_TOKEN = "<AUD>"
AUD_VIS_TOKEN = "<AUD_VIS>"
MODALITY_TOKENS = (VIS_TOKEN, AUD_TOKEN, AUD_VIS_TOKEN)

# One placeholder id per kind of embedding position.
TEMPORAL_ID = -201  # H_t: one per frame ([CLS] of each of the T frames)
SPATIAL_ID = -202  # H_s: one per patch (patch tokens averaged over the T frames)
AUDIO_ID = -301  # H_a: one per audio segment
PLACEHOLDER_IDS = (TEMPORAL_ID, SPATIAL_ID, AUDIO_ID)

IGNORE_INDEX = -100  # label value of positions that carry no loss


@dataclass(frozen=True)
class TokenLayout:
    """How many embedding positions each modality token expands to."""

    num_frames: int  # T
    num_patches: int  # N
    num_audio_segments: int  # K

    def expansion(self, token: str) -> list[int]:
        """Placeholder ids that replace one modality token, in the paper's order [H_t; H_s; H_a]."""
        vis = [TEMPORAL_ID] * self.num_frames + [SPATIAL_ID] * self.num_patches
        aud = [AUDIO_ID] * self.num_audio_segments
        if token == VIS_TOKEN:
            return vis
        if token == AUD_TOKEN:
            return aud
        if token == AUD_VIS_TOKEN:
            return vis + aud
        raise ValueError(f"unknown modality token {token!r}; expected one of {MODALITY_TOKENS}")

    def length(self, token: str) -> int:
        return len(self.expansion(token))


def needs_visual(input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample flag [B]: does any position ask for visual tokens? (selective activation)"""
    return (input_ids == TEMPORAL_ID).any(dim=-1) | (input_ids == SPATIAL_ID).any(dim=-1)


def needs_audio(input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample flag [B]: does any position ask for audio tokens?"""
    return (input_ids == AUDIO_ID).any(dim=-1)


def tokens_in(text: str) -> list[str]:
    """Modality tokens of a text, in order of appearance."""
    import re

    return re.findall("|".join(map(re.escape, MODALITY_TOKENS)), text)


def split_tokens(text: str) -> tuple[list[str], str]:
    """(modality tokens, the question) of a human turn as manifests write it: the token line, then
    the question ("<AUD>\nWould you call ...?", or "<AUD> Would ..."), as training reads it: the
    tokens wherever they are, whitespace around them dropped, every word of the question kept."""
    import re

    tokens = tokens_in(text)
    rest = re.sub("|".join(map(re.escape, MODALITY_TOKENS)), " ", text)
    return tokens, " ".join(rest.split())


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
    """Replace every placeholder position of `embeds` [b, s, h] by its feature row.

    `features` maps a placeholder id to [b, length, h]. The j-th position of a kind in a sample
    takes row j mod length, so several modality tokens in one conversation each get the whole
    sequence, in order. Shared by the megatron model and the exported Hugging Face model."""
    for pid, feat in features.items():
        mask = input_ids == pid
        if not mask.any():
            continue
        row = (mask.long().cumsum(dim=1) - 1).clamp(min=0) % feat.shape[1]
        picked = torch.gather(feat, 1, row.unsqueeze(-1).expand(-1, -1, feat.shape[-1]))
        embeds = torch.where(mask.unsqueeze(-1), picked.to(embeds.dtype), embeds)
    return embeds
