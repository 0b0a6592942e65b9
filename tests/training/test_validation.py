"""Validation: loss per modality over a held-out manifest, through the training loader's
dataset/collate path and megatron's forward-only schedule; logged and used to rank checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.data.loaders import EvalBatchSampler, eval_loader
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training import checkpoint, optim
from nemo_avllm.training.callbacks import read_metrics
from nemo_avllm.training.data import model_spec

SEQ = 128


def test_eval_batches_cover_every_sample_once_over_data_parallel_ranks():
    ranks = [EvalBatchSampler(9, 2, r, 2) for r in range(2)]
    real = [i for s in ranks for batch, n in zip(s, s.real_rows) for i in batch[:n]]
    assert sorted(real) == list(range(9))
    assert all(len(b) == 2 for s in ranks for b in s)  # fixed micro-batch shape (pipeline stages)
    assert ranks[0].real_rows == [2, 2, 1] and ranks[1].real_rows == [2, 2]


@pytest.mark.parametrize("packing", [False, True])
def test_validation_loss_per_modality_equals_the_per_sample_losses(dist1, media_data, tokenizer, packing):
    from nemo_avllm.data.manifest_checks import validate_manifest
    from nemo_avllm.model.loss import masked_token_loss
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training.lightning_module import validation_losses

    cfg = config.load_model("tiny")
    samples, _ = validate_manifest(media_data["validation"], tokenizer=tokenizer, layout=avllm_config(cfg).layout(), max_length=SEQ)
    assert sorted(s.modality for s in samples) == ["A"] * 3 + ["AV"] * 3 + ["V"] * 3
    distributed.set_seed(3)
    model = build_model(cfg)
    optim.freeze_for_stage(model, ["projectors", "llm"])
    ddp = optim.wrap_ddp(model, use_distributed_optimizer=False)
    model.config.calculate_per_token_loss = True
    # 9 samples in micro-batches of 2: the last one is padded, and the padding must not count.
    # Packed: rows of 2 x SEQ, so samples of different modalities share a row (grouped by sample)
    seq = 2 * SEQ if packing else SEQ
    loader = eval_loader(model_spec(cfg, "cpu", global_batch_size=2, micro_batch_size=2, seq_length=seq, num_workers=0,
                                    packing=packing), samples, tokenizer)
    if packing:
        rows = [set(row.tolist()) - {-1} for (b,) in loader for row in b["sample_of_token"]]
        assert any(len(r) == 2 for r in rows), rows
    got = validation_losses(ddp, loader, seq, 2)
    assert ddp.training  # back in training mode

    sums = {}
    model.eval()
    with torch.no_grad():
        for batch in eval_loader(model_spec(cfg, "cpu", global_batch_size=1, micro_batch_size=1, seq_length=SEQ,
                                            num_workers=0), samples, tokenizer):
            per_token = model(input_ids=batch["input_ids"], labels=batch["labels"], video=batch.get("video"),
                              audio=batch.get("audio"))
            loss, n = masked_token_loss(per_token, batch["loss_mask"])
            view = batch["modality"][0]
            sums[view] = [a + float(b) for a, b in zip(sums.get(view, [0.0, 0.0]), (loss, n))]
    model.train()
    expected = {f"val_loss_{v}": l / n for v, (l, n) in sums.items()}
    expected["val_loss"] = sum(l for l, _ in sums.values()) / sum(n for _, n in sums.values())
    assert set(got) == set(expected) == {"val_loss", "val_loss_V", "val_loss_A", "val_loss_AV"}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_validation_is_logged_and_ranks_the_checkpoints(media_reference_run):
    """`avllm train` with a validation manifest (conftest.media_run_args: validation and a top-1
    checkpoint every 2 of 6 steps)."""
    run = media_reference_run
    metrics = {m["step"]: m for m in read_metrics(run)}
    keys = ("val_loss", "val_loss_V", "val_loss_A", "val_loss_AV")
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    for step in (2, 4, 6):
        assert all(math.isfinite(metrics[step][k]) for k in keys), metrics[step]
    assert not any(k in metrics[s] for s in (1, 3, 5) for k in keys)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for f in run.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(f)).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    for k in keys:
        assert [s for s, _ in scalars.get(k, [])] == [2, 4, 6], (k, sorted(scalars))
        assert [v for _, v in scalars[k]] == pytest.approx([metrics[s][k] for s in (2, 4, 6)], rel=1e-6)

    # the best-1 checkpoint is the step with the lowest validation loss, as the callback recorded it
    best_step = min((2, 4, 6), key=lambda s: metrics[s]["val_loss"])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if checkpoint.is_checkpoint(p))
    assert [n for n in ckpts if not n.endswith("-last")] == [f"run--step_{best_step}"], ckpts
    last = next(run.glob("checkpoints/*-last"))
    states = checkpoint.load_common(last)["lightning"]["callbacks"]
    key = next(k for k in states if "ModelCheckpoint" in k)
    assert "'monitor': 'val_loss'" in key
    assert float(states[key]["best_model_score"]) == pytest.approx(metrics[best_step]["val_loss"], rel=1e-6)
