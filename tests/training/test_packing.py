"""Sequence packing (issue 22): packed rows give the unpacked loss and gradients, attention stays
inside a sample, and the packing plan is what the bench and the loader share."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm import config, modality
from nemo_avllm.data.collate import collate_av
from nemo_avllm.data.conversation import TokenizedSample
from nemo_avllm.data.packing import PackedRows, PackingSpec, collate_packed, first_fit_decreasing, useful_fraction
from nemo_avllm.model.avllm import EncoderFeatures
from tests.data.test_dataset import data, model_cfg  # noqa: F401 (fixtures)
from tests.training import helpers

SEQ = 96
TOKENS = (modality.VIS_TOKEN, modality.AUD_TOKEN, modality.AUD_VIS_TOKEN, modality.AUD_TOKEN,
          modality.VIS_TOKEN, modality.AUD_TOKEN)


def _items(model, prompt_lengths=(5, 9, 3, 12, 7, 4), seed=0, vocab=500):
    """Items as the dataset yields them (tokens + cached features), modalities V, A, AV mixed."""
    g = torch.Generator().manual_seed(seed)
    lay = model.layout
    dv, da = model.cfg.vision.geometry()["width"], model.cfg.audio.width
    out = []
    for k, (tok, p) in enumerate(zip(TOKENS, prompt_lengths)):
        q = torch.randint(3, vocab, (p,), generator=g).tolist()
        a = torch.randint(3, vocab, (6 + k,), generator=g).tolist()
        exp = lay.expansion(tok)
        ids = [1] + q + exp + a + [2]
        labels = [modality.IGNORE_INDEX] * (1 + p + len(exp)) + a + [2]
        feats = {"temporal": torch.randn(lay.num_frames, dv, generator=g),
                 "spatial": torch.randn(lay.num_patches, dv, generator=g),
                 "audio": torch.randn(lay.num_audio_segments, da, generator=g)}
        want = {"temporal": "VIS" in tok, "spatial": "VIS" in tok, "audio": "AUD" in tok}
        out.append({"id": f"s{k}", "modality": tok, "tokens": TokenizedSample(ids, labels),
                    "features": {kk: v for kk, v in feats.items() if want[kk]}})
    return out


def _feats(batch):
    return EncoderFeatures(**batch["features"])


def _loss_and_grads(model, batches):
    """Token-averaged loss over `batches` and the gradients it gives (what the DDP step sums)."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0.0
    for b in batches:
        out = model(input_ids=b["input_ids"], labels=b["labels"], features=_feats(b), packed=PackedRows.from_batch(b))
        mask = b["loss_mask"].float()
        total = total + (out.float() * mask).sum()
        count += float(mask.sum())
    loss = total / count
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def model(dist1):
    from nemo_avllm.model.provider import build_model

    torch.manual_seed(0)
    m = build_model(config.load_model("tiny", ["build_encoders=false"]))
    m.float()
    return m


def test_packed_loss_and_grads_equal_unpacked(model):
    items = _items(model)
    unpacked = collate_av(items, seq_length=SEQ)
    spec = PackingSpec(seq_length=SEQ, rows_per_micro_batch=2)
    packed = collate_packed(items, spec, lambda its, n: collate_av(its, n))
    assert len(packed) >= 1 and sum(b["input_ids"].shape[0] for b in packed) == len(items)
    rows = sum(int(b["pack_shape"][0]) for b in packed)
    assert rows < len(items), "the samples should share rows"
    assert any(len({int(s) for s in row if s >= 0}) > 1 for b in packed for row in b["sample_of_token"])
    # MAT counts are sample counts: every sample, as its own modality, exactly once
    assert sorted(m for b in packed for m in b["modality"]) == sorted(it["modality"] for it in items)
    assert int(sum(b["loss_mask"].sum() for b in packed)) == int(unpacked["loss_mask"].sum())

    loss_u, grads_u = _loss_and_grads(model, [unpacked])
    loss_p, grads_p = _loss_and_grads(model, packed)
    assert abs(loss_u - loss_p) < 1e-5, (loss_u, loss_p)
    assert grads_u.keys() == grads_p.keys() and any(k.startswith("proj_audio") for k in grads_u)
    for name in grads_u:
        diff = (grads_u[name] - grads_p[name]).abs().max().item()
        assert diff < 1e-5, f"{name}: packed and unpacked gradients differ by {diff}"


def test_packed_rows_under_activation_recompute(dist1):
    """Stage 2 recomputes activations: the block mask and per-sample RoPE positions reach the
    recomputed layers (same loss and gradients as the packed run without recompute)."""
    from nemo_avllm.model.provider import build_model

    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = build_model(config.load_model("tiny", ["build_encoders=false", f"activations_checkpoint={recompute}"]))
        packed = collate_packed(_items(m), PackingSpec(seq_length=SEQ, rows_per_micro_batch=2), collate_av)
        runs.append(_loss_and_grads(m, packed))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for name, g in runs[0][1].items():
        assert torch.allclose(g, runs[1][1][name], atol=1e-6), name


def test_one_sample_does_not_see_another_in_its_row(model):
    items = _items(model)
    spec = PackingSpec(seq_length=SEQ, rows_per_micro_batch=8)
    collate = lambda its, n: collate_av(its, n)  # noqa: E731
    (batch,) = collate_packed(items, spec, collate)
    owner = batch["sample_of_token"]
    row = next(r for r in range(owner.shape[0]) if len({int(s) for s in owner[r] if s >= 0}) > 1)
    # the sample placed first in the row is changed; a plain causal mask would let the next see it
    changed_one, watched = list(dict.fromkeys(x for x in owner[row].tolist() if x >= 0))[:2]
    victim = int(batch["item_order"][changed_one])
    changed = [dict(it) for it in items]
    t = changed[victim]["tokens"]
    changed[victim]["tokens"] = TokenizedSample([1] + [(x * 5 + 11) % 400 + 3 if x > 2 else x for x in t.input_ids[1:]],
                                                t.labels)
    changed[victim]["features"] = {k: v + 1.0 for k, v in changed[victim]["features"].items()}
    (batch2,) = collate_packed(changed, spec, collate)
    assert torch.equal(batch2["sample_of_token"], owner), "same lengths, same layout"
    with torch.no_grad():
        logits = [model(input_ids=b["input_ids"], features=_feats(b), packed=PackedRows.from_batch(b))
                  for b in (batch, batch2)]
    mine, theirs = owner[row] == watched, owner[row] == changed_one
    assert not torch.allclose(logits[0][row][theirs], logits[1][row][theirs]), "the change must matter to its sample"
    assert torch.equal(logits[0][row][mine], logits[1][row][mine])


def test_positions_restart_and_mask_is_block_diagonal():
    rows = PackedRows(torch.tensor([0, 3, 5, 8, 10, 16], dtype=torch.int32), (2, 8))
    assert rows.position_ids().tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    mask = rows.attention_mask()[:, 0]
    allowed = ~mask[0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False, False, False]
    p = rows.packed_seq_params()
    assert p.qkv_format == "thd" and p.max_seqlen_q == 6 and p.cu_seqlens_q.dtype == torch.int32


def test_first_fit_decreasing_and_useful_fraction():
    assert first_fit_decreasing([5, 3, 8, 2, 6], 10) == [[2, 3], [4, 1], [0]]
    with pytest.raises(ValueError, match="more than seq_length"):
        first_fit_decreasing([11], 10)
    lengths = [340] * 10 + [55] * 4 + [345] * 6
    padded = sum(lengths) / (len(lengths) * 1024)
    cut = useful_fraction(lengths, PackingSpec(1024, 1))
    fixed = useful_fraction(lengths, PackingSpec(1024, 1, fixed_shape=True))
    assert padded < 0.35 < fixed <= cut <= 1.0 and cut > 0.9


def test_packed_steps_hold_the_same_mat_samples_as_unpacked_micro_batches():
    """The loader's packed step is the sampler's step share: the same (sample, view) items per
    global batch, so MAT counts stay sample counts and resume from consumed_samples stays exact."""
    from nemo_avllm.data.mat_sampler import MATBatchSampler
    from tests.data.test_mat_sampler import RATIOS, samples

    pool = samples()
    for dp_rank in (0, 1):
        micro = MATBatchSampler(pool, RATIOS, 8, 2, dp_rank, 2, seed=3, consumed_samples=8)
        packed = MATBatchSampler(pool, RATIOS, 8, 4, dp_rank, 2, seed=3, consumed_samples=8)
        mbs = list(micro)
        steps = [sum(mbs[i:i + 2], []) for i in range(0, len(mbs), 2)]
        assert steps == list(packed) and len(steps) == micro.batches_per_epoch - 1


def _run_metrics(tmp_path, name, steps, packing, nproc=1, **extra):
    from nemo_avllm.training.callbacks import read_metrics

    args = helpers.overrides(tmp_path / name, steps=steps, every=2, **{"model.data.packing": packing, **extra})
    helpers.run(args, nproc=nproc)
    return read_metrics(tmp_path / name / "run")


def test_packed_training_matches_unpacked_resumes_exactly_and_logs_data_stalls(tmp_path):
    import json
    import signal

    # micro_batch_size 2 and global batch 4 (helpers.overrides): unpacked, 2 micro-batches of 2 samples
    packed = _run_metrics(tmp_path, "packed", 3, "true")
    unpacked = _run_metrics(tmp_path, "unpacked", 3, "false")
    assert [m["step"] for m in packed] == [1, 2, 3]
    for p, u in zip(packed, unpacked):
        for key in ("samples_V", "samples_A", "samples_AV", "consumed_samples"):
            assert p[key] == u[key], (key, p, u)  # MAT counts are sample counts
        assert p["reduced_train_loss"] == pytest.approx(u["reduced_train_loss"], rel=1e-5, abs=1e-6)
        assert p["micro_batches"] == 1 and u["micro_batches"] == 2  # four samples fit in two rows
        assert p["data_wait_s"] >= 0 and p["compute_s"] > 0
    stall = json.loads((tmp_path / "packed" / "run" / "data_stall.json").read_text())
    assert stall["steps"] == 3 and 0 <= stall["stall_fraction"] < 1

    # SIGTERM after step 1 (final checkpoint), then the same command resumes: bit-exact losses
    args = helpers.overrides(tmp_path / "resumed", steps=3, every=1000, **{"model.data.packing": "true"})
    proc = helpers.start(args)
    helpers.wait_for_step(tmp_path / "resumed" / "run", 1, proc)
    helpers.kill(proc, signal.SIGTERM)
    stopped = max(helpers.losses_by_step(tmp_path / "resumed" / "run"))
    assert stopped < 3
    _, out = helpers.run(args)
    assert "Resuming training from checkpoint" in out
    got = helpers.losses_by_step(tmp_path / "resumed" / "run")
    ref = {m["step"]: m["reduced_train_loss"] for m in packed}
    assert sorted(got) == list(range(stopped + 1, 4))  # the resumed run's steps
    for step in got:
        assert got[step] == ref[step], (step, got[step], ref[step])


def test_data_parallel_ranks_get_balanced_tokens_and_the_same_global_batch():
    from nemo_avllm.data.mat_sampler import MATBatchSampler
    from nemo_avllm.data.packing import balance_ranks, token_balanced
    from tests.data.test_mat_sampler import RATIOS, samples

    pool = samples()
    length = {"V": 300, "A": 50, "AV": 345}

    def length_of(item):  # modality placeholders plus a text length that varies by sample
        return length[item[1]] + 7 * (item[0] % 5)

    plain = MATBatchSampler(pool, RATIOS, 16, 4, 0, 4, seed=1)
    ranks = [MATBatchSampler(pool, RATIOS, 16, 4, r, 4, seed=1) for r in range(4)]
    balanced = [token_balanced(MATBatchSampler)(pool, RATIOS, 16, 4, r, 4, seed=1, length_of=length_of)
                for r in range(4)]
    spread = {"plain": [], "balanced": []}
    for step in range(6):
        before, after = plain.rank_batches(step), balanced[0].rank_batches(step)
        assert sorted(sum(after, [])) == sorted(sum(before, []))  # same items: MAT counts unchanged
        assert [len(r) for r in after] == [len(r) for r in before]
        assert [balanced[r].rank_batches(step)[r] for r in range(4)] == after  # every rank agrees
        for name, deal in (("plain", before), ("balanced", after)):
            tokens = [sum(length_of(it) for it in r) for r in deal]
            spread[name].append(max(tokens) - min(tokens))
    # 3 short <AUD> among 16 samples on 4 ranks of 4: one rank has only long ones (spread >= ~230)
    assert max(spread["balanced"]) < min(spread["plain"]), spread
    # what a rank iterates is its balanced share
    assert list(balanced[2])[0] == balanced[2].rank_batches(0)[2]
    assert list(ranks[2])[0] == plain.rank_batches(0)[2]
    assert balance_ranks([[1, 2], [3, 4]], [[10, 1], [9, 2]]) == [[1, 2], [3, 4]]


def test_real_loader_packs_live_decoded_steps_over_two_ranks(data, tokenizer, model_cfg):
    """`train_loader` with `spec.packing` on real media (decoded live, a corrupt file replaced):
    one item per step and rank, holding the sampler's global batch, balanced by tokens."""
    from collections import Counter

    from nemo_avllm.data.loaders import train_loader
    from nemo_avllm.data.mat_sampler import MATBatchSampler
    from nemo_avllm.training.data import model_spec
    from tests.data.test_dataset import RATIOS

    _, _, samples = data
    kw = dict(global_batch_size=6, micro_batch_size=2, seq_length=96, mat_ratios=RATIOS, derive_views=True, seed=1,
              dp_size=2, num_workers=0, packing=True)
    steps = [list(train_loader(model_spec(model_cfg, "cpu", dp_rank=r, **kw), samples, tokenizer)) for r in range(2)]
    plain = MATBatchSampler(samples, RATIOS, 6, 3, 0, 2, seed=1, derive_views=True)
    assert [len(s) for s in steps] == [2, 2]  # 12 samples // 6: two steps
    for step in range(2):
        got = [b for rank in steps for b in rank[step]]
        assert all(isinstance(b, dict) and "cu_seqlens" in b for b in got)
        views = Counter(m for b in got for m in b["modality"])
        assert views == Counter(v for _, v in plain.global_batch(step)) == {"V": 3, "A": 1, "AV": 2}
        for b in got:  # every packed position is a real token of one sample, or padding
            assert int((b["sample_of_token"] >= 0).sum()) == int((b["input_ids"] != 0).sum())
            assert b["pack_shape"].tolist()[1] <= 96 and ("video" in b or "audio" in b)


@pytest.mark.distributed
def test_packed_pipeline_parallel_run_matches_the_unpacked_one(tmp_path):
    """PP=2: fixed micro-batch shapes, the packed layout reaching the last stage; same losses."""
    pp2 = {"trainer.devices": 2, "model.pipeline_model_parallel_size": 2}
    packed = _run_metrics(tmp_path, "packed", 2, "true", nproc=2, **pp2)
    unpacked = _run_metrics(tmp_path, "unpacked", 2, "false", nproc=2, **pp2)
    assert [m["micro_batches"] for m in packed] == [1, 1] and [m["micro_batches"] for m in unpacked] == [2, 2]
    for p, u in zip(packed, unpacked):
        assert p["reduced_train_loss"] == pytest.approx(u["reduced_train_loss"], rel=1e-5)
        assert (p["samples_V"], p["samples_A"], p["samples_AV"]) == (u["samples_V"], u["samples_A"], u["samples_AV"])
