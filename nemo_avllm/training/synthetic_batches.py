"""Synthetic micro-batches in the training contract, for benchmarks and GPU checks: each sample a
conversation (a short prompt, the modality placeholders, an answer filling the sequence, loss on
the answer) with cached-feature inputs or raw media for the encoders. `mix="mat"` gives the
micro-batches MAT produces (V-only, A-only, AV-only and mixed ones, so some lack a modality);
`mix="av"` every sample <AUD_VIS>."""

from __future__ import annotations

import torch

from nemo_avllm import modality
from nemo_avllm.data.collate import collate_tokens
from nemo_avllm.data.conversation import TokenizedSample


# micro-batch k of a "mat" mix: one modality token for all its samples, or (None) one per sample
MAT_MIX = (modality.VIS_TOKEN, modality.AUD_TOKEN, modality.AUD_VIS_TOKEN, None)


def synthetic_batches(model, n: int, mbs: int, seq: int, device, encoders: bool, dtype, seed: int = 0,
                      mix: str = "av") -> list[dict]:
    """`n` micro-batches of `mbs` samples of length `seq` for `model` (an AVLLM: its token layout,
    vocab and encoder widths), on `device`; media/features in `dtype`."""
    if mix not in ("av", "mat"):
        raise ValueError(f"mix={mix!r}; expected av or mat")
    g = torch.Generator().manual_seed(seed)
    lay, vocab = model.layout, model.cfg.llm.vocab_size
    prompt = 16
    longest = len(lay.expansion(modality.AUD_VIS_TOKEN))
    if seq - 1 - prompt - longest < 8:
        raise ValueError(f"seq_length {seq} leaves no room for an answer after {longest} modality positions")
    dv, da = model.cfg.vision.geometry()["width"], model.cfg.audio.width
    batches = []
    for mb in range(n):
        samples = []
        for j in range(mbs):
            tok = modality.AUD_VIS_TOKEN if mix == "av" else MAT_MIX[mb % len(MAT_MIX)] or modality.MODALITY_TOKENS[j % 3]
            placeholders = lay.expansion(tok)
            answer = seq - 1 - prompt - len(placeholders)
            q = torch.randint(3, vocab, (prompt,), generator=g).tolist()
            a = torch.randint(3, vocab, (answer + 1,), generator=g).tolist()
            samples.append(TokenizedSample([1] + q + placeholders + a[:-1],
                                           [modality.IGNORE_INDEX] * (1 + prompt + len(placeholders)) + a[:-1]))
        b = {k: v.to(device) for k, v in collate_tokens(samples, seq_length=seq).items()}
        if encoders:
            size = model.cfg.vision.geometry()["image_size"]
            b["video"] = torch.randn(mbs, lay.num_frames, 3, size, size, generator=g).to(device, dtype)
            b["audio"] = (0.1 * torch.randn(mbs, lay.num_audio_segments, model.cfg.audio.clip_samples, generator=g)).to(device)
        else:
            b["features"] = {
                "temporal": torch.randn(mbs, lay.num_frames, dv, generator=g).to(device, dtype),
                "spatial": torch.randn(mbs, lay.num_patches, dv, generator=g).to(device, dtype),
                "audio": torch.randn(mbs, lay.num_audio_segments, da, generator=g).to(device, dtype),
            }
        batches.append(b)
    return batches
