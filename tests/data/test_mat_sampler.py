"""Modality-Augmented Training batches: exact ratios, determinism, DP sharding, exact resume,
no repeats within a global batch, per-rank modality shares, and the Table 5 schedules."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from nemo_avllm.data.manifest import Sample
from nemo_avllm.data.mat_sampler import MATBatchSampler, PoolStream, largest_remainder, normalise_ratios
from nemo_avllm.errors import UserError

RATIOS = {"V": 0.5, "A": 0.2, "AV": 0.3}


def samples(n_v=20, n_a=7, n_av=9, views=()):
    """Manifest samples of each modality class (the sampler reads only modality and views);
    `views`: the per-modality conversations every AV sample carries (their turns don't matter here)."""
    out = []
    for mod, n in (("V", n_v), ("A", n_a), ("AV", n_av)):
        for _ in range(n):
            i = len(out)
            out.append(Sample(id=f"{mod}{i}", video=f"/data/{i}.mp4", audio=None, conversations=[], modality=mod,
                              has_audio=mod != "V", media_id=f"m{i}",
                              views={v: [] for v in views} if mod == "AV" and views else None))
    return out


def global_batches(sampler, dp_size=1):
    """Regroup one rank's micro-batches into its part of each global batch."""
    per_global = sampler.global_batch_size // dp_size // sampler.micro_batch_size
    mbs = list(sampler)
    return [sum(mbs[i : i + per_global], []) for i in range(0, len(mbs), per_global)]


def test_largest_remainder_counts():
    assert largest_remainder(RATIOS, 256) == {"V": 128, "A": 51, "AV": 77}  # 51.2, 76.8 -> 51, 77
    assert largest_remainder(RATIOS, 8) == {"V": 4, "A": 2, "AV": 2}  # 1.6, 2.4 -> 2, 2
    assert largest_remainder({"V": 1 / 3, "A": 1 / 3, "AV": 1 / 3}, 10) == {"V": 4, "A": 3, "AV": 3}
    for g in range(1, 70):
        c = largest_remainder(RATIOS, g)
        assert sum(c.values()) == g and all(abs(c[m] - RATIOS[m] * g) < 1 for m in c)


def test_every_global_batch_has_the_exact_counts():
    s = MATBatchSampler(samples(), RATIOS, global_batch_size=10, micro_batch_size=1)
    assert s.counts == {"V": 5, "A": 2, "AV": 3} and s.batches_per_epoch == 36 // 10
    batches = global_batches(s)
    assert len(batches) == 3
    for b in batches:
        assert Counter(v for _, v in b) == {"V": 5, "A": 2, "AV": 3}
        assert all(samples()[i].modality == v for i, v in b)  # no derivation: native views only
        assert [v for _, v in b] != sorted(v for _, v in b)  # modalities interleaved over the slots


def test_missing_modality_is_redistributed_with_a_warning():
    with pytest.warns(UserWarning, match="no samples of modality A"):
        s = MATBatchSampler(samples(n_a=0), RATIOS, global_batch_size=8, micro_batch_size=2)
    assert s.ratios == pytest.approx({"V": 0.625, "AV": 0.375}) and s.counts == {"V": 5, "AV": 3}
    with pytest.warns(UserWarning, match="7 A items will never be sampled"):
        normalise_ratios({"V": 1.0}, {"V": 3, "A": 7})
    with pytest.raises(ValueError, match="unknown modalities"):
        normalise_ratios({"IMG": 1.0}, {"V": 3})
    with pytest.raises(ValueError, match="no samples for any modality"):
        MATBatchSampler(samples(n_v=0), {"V": 1.0}, 4, 1)


def test_oversampled_modality_uses_every_item_before_repeating():
    s = MATBatchSampler(samples(n_v=30, n_a=3, n_av=7), {"V": 0.5, "A": 0.25, "AV": 0.25}, 8, 2)
    a_items = [i for b in global_batches(s) for i, v in b if v == "A"]  # 5 batches x 2 = 10 from a pool of 3
    assert len(a_items) == 10
    for k in range(0, 9, 3):
        assert sorted(a_items[k : k + 3]) == [30, 31, 32]  # one permutation per pass


def test_deterministic_given_seed_and_reshuffled_per_epoch():
    def run(seed, epochs=2):
        s = MATBatchSampler(samples(), RATIOS, 12, 3, seed=seed)
        return [list(s) for _ in range(epochs)]

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert a[0] != a[1]  # epoch 1 is a different shuffle of the same pools
    assert Counter(i for mb in a[0] for i, _ in mb) != Counter()  # non-empty


def test_dp_ranks_cover_each_global_batch_exactly_once_with_their_share_of_each_modality():
    whole = MATBatchSampler(samples(), RATIOS, 12, 3, seed=3)
    full = global_batches(whole)
    parts = [global_batches(MATBatchSampler(samples(), RATIOS, 12, 3, dp_rank=r, dp_size=4, seed=3), 4)
             for r in range(4)]
    assert all(len(p) == len(full) for p in parts)
    counts = whole.counts  # {V: 6, A: 2, AV: 4} over 4 ranks: 1-2, 0-1, 1 each
    for b, batch in enumerate(full):
        assert sorted(sum((p[b] for p in parts), [])) == sorted(batch)  # the same items, dealt to ranks
        for p in parts:
            got = Counter(v for _, v in p[b])
            assert all(abs(got[m] - counts[m] / 4) < 1 for m in counts), (b, got)
    s = MATBatchSampler(samples(), RATIOS, 12, 3, dp_rank=1, dp_size=2)
    assert all(len(mb) == 3 for mb in s) and len(MATBatchSampler(samples(), RATIOS, 12, 3, dp_rank=1, dp_size=2)) == 6
    with pytest.raises(ValueError, match="not a multiple of data-parallel size 4 x micro batch 2"):
        MATBatchSampler(samples(), RATIOS, 12, 2, dp_size=4)


def test_two_ranks_each_get_their_share_of_a_modality_every_step():
    """DP=2 as training runs it (one sampler per rank): a global batch of 8 with 3 AV items gives
    each rank 1 or 2 of them, never 0 and 3 (the old arrangement dealt slots at random)."""
    kw = dict(global_batch_size=8, micro_batch_size=2, seed=11)
    ranks = [global_batches(MATBatchSampler(samples(40, 20, 20), RATIOS, dp_rank=r, dp_size=2, **kw), 2)
             for r in range(2)]
    for b in range(len(ranks[0])):
        per_rank = [Counter(v for _, v in r[b]) for r in ranks]
        assert per_rank[0] + per_rank[1] == {"V": 4, "A": 2, "AV": 2}
        assert all(c[m] == 2 if m == "V" else c[m] == 1 for c in per_rank for m in ("V", "A", "AV")), per_rank


@pytest.mark.parametrize("stop_after", [1, 5, 7])
def test_resume_from_consumed_samples_equals_uninterrupted_run(stop_after):
    def flat(sampler, epochs):
        return [mb for _ in range(epochs) for mb in sampler]

    G = 12
    ref = flat(MATBatchSampler(samples(), RATIOS, G, 2, dp_rank=1, dp_size=2, seed=5, derive_views=True), 3)
    assert len(ref) == 3 * 3 * 3
    per_step = G // 2 // 2  # micro-batches per global batch on this rank

    first = MATBatchSampler(samples(), RATIOS, G, 2, dp_rank=1, dp_size=2, seed=5, derive_views=True)
    got = list(itertools.islice(itertools.chain(first, first, first), stop_after * per_step))
    state = first.state_dict()
    assert state == {"consumed_samples": stop_after * G, "epoch": stop_after // first.batches_per_epoch}

    resumed = MATBatchSampler(samples(), RATIOS, G, 2, dp_rank=1, dp_size=2, seed=5, derive_views=True)
    resumed.load_state_dict(state)
    got += flat(resumed, 3 - state["epoch"])
    assert got == ref
    # the count is global: the same global batches after resuming with another DP size
    whole = MATBatchSampler(samples(), RATIOS, G, 2, seed=5, derive_views=True, consumed_samples=stop_after * G)
    other = MATBatchSampler(samples(), RATIOS, G, 2, dp_rank=1, dp_size=2, seed=5, derive_views=True,
                            consumed_samples=stop_after * G)
    assert set(global_batches(whole)[0]) >= set(global_batches(other, 2)[0])
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        first.load_state_dict({"consumed_samples": 13})


def test_views_come_only_from_the_manifest():
    """An AV sample yields V/A items only through the `views` its manifest line gives."""
    bare = samples(n_v=8, n_a=0, n_av=8)
    with pytest.warns(UserWarning, match="no samples of modality A"):
        s = MATBatchSampler(bare, RATIOS, 10, 1, derive_views=True)
    assert {m: len(p) for m, p in s.pools.items()} == {"V": 8, "AV": 8}  # no token rewriting
    data = samples(n_v=4, n_a=0, n_av=8, views=("V", "A"))
    s = MATBatchSampler(data, RATIOS, 10, 1, derive_views=True)
    assert {m: len(p) for m, p in s.pools.items()} == {"V": 12, "A": 8, "AV": 8}
    assert {i for i, _ in s.pools["A"]} == {i for i, _ in s.pools["AV"]} == set(range(4, 12))
    assert {i for i, v in s.pools["V"] if i >= 4} == set(range(4, 12))  # the AV clips' own V conversations
    for b in global_batches(s):
        assert Counter(v for _, v in b) == {"V": 5, "A": 2, "AV": 3}
    with pytest.warns(UserWarning, match="no samples of modality A"):
        MATBatchSampler(data, RATIOS, 5, 1, derive_views=False)


def test_no_ratios_means_natural_proportions_without_repeats():
    data = samples(n_v=6, n_a=2, n_av=4)
    s = MATBatchSampler(data, None, 4, 2, seed=1)
    items = [it for mb in s for it in mb]
    assert sorted(items) == [(i, d.modality) for i, d in enumerate(data)]  # one epoch = every sample once


def test_streams_differ_for_every_seed_and_epoch():
    """The old stream seed (seed + epoch) made seed 1 / epoch 1 replay seed 2 / epoch 0."""
    def epochs(seed, n=2):  # per epoch, the items of each global batch (their arrangement aside)
        s = MATBatchSampler(samples(), RATIOS, 12, 3, seed=seed)
        return [[sorted(b) for b in global_batches(s)] for _ in range(n)]

    one, two = epochs(1), epochs(2)
    assert one[1] != two[0] and one[0] != two[0] and one[0] != one[1]


@pytest.mark.parametrize("n_a, a_share", [(5, 3), (7, 3), (4, 4)])
def test_no_item_twice_in_a_global_batch_across_passes(n_a, a_share):
    """A modality with few items is read in passes; a batch that straddles two passes still holds
    distinct items, and every item is used once per pass."""
    G = 10
    ratios = {"V": (G - a_share) / G, "A": a_share / G}
    s = MATBatchSampler(samples(n_v=40, n_a=n_a, n_av=0), ratios, G, 1, seed=9)
    batches = [s.global_batch(step) for step in range(40)]
    assert all(len(set(b)) == len(b) for b in batches)
    a_items = [s.streams["A"].take(t) for t in range(40)]
    flat = [int(x) for t in a_items for x in t]
    for k in range(0, len(flat) - n_a + 1, n_a):
        assert sorted(flat[k : k + n_a]) == list(range(n_a)), k  # one permutation per pass
    assert sum(len(set(t)) < len(t) for t in a_items) == 0
    with pytest.raises(UserError, match="A has 3 items but a global batch takes 4"):
        PoolStream(3, 4, 0, 1, "A")


def test_pool_stream_resumes_at_any_chunk():
    ref = PoolStream(7, 3, 5, 2)
    want = [ref.take(t).tolist() for t in range(30)]
    for t in (0, 4, 13, 29):
        assert PoolStream(7, 3, 5, 2).take(t).tolist() == want[t]


# -- Table 5 training strategies (model.data.modality_schedule) ----------------------------------


def schedule_sampler(schedule, dp_rank=0, dp_size=1, consumed=0, **kw):
    return MATBatchSampler(samples(60, 30, 40), RATIOS, 10, 5, dp_rank=dp_rank, dp_size=dp_size, seed=4,
                           consumed_samples=consumed, schedule=schedule, split=kw.pop("split", 0.4),
                           max_steps=kw.pop("max_steps", 10), **kw)


def mixes(sampler, steps):
    return [dict(Counter(v for _, v in sampler.global_batch(step))) for step in range(steps)]


def test_mat_schedule_mixes_every_batch():
    assert mixes(schedule_sampler("mat"), 10) == [{"V": 5, "A": 2, "AV": 3}] * 10


def test_pt1_is_audio_visual_first_then_visual_or_audio_batches():
    """10 steps, split 0.4: steps 0-3 AV only; steps 4-9 single-modality batches, V or A in the
    ratio 0.5 : 0.2 (V iff round((t+1)*5/7) > round(t*5/7)): V A V V V A."""
    s = schedule_sampler("pt1")
    assert s.plan.boundary == 4
    assert mixes(s, 10) == [{"AV": 10}] * 4 + [{"V": 10}, {"A": 10}, {"V": 10}, {"V": 10}, {"V": 10}, {"A": 10}]
    assert "steps [0, 4) AV, then V or A batches" in s.plan.describe()


def test_pt2_is_separate_first_then_merged():
    s = schedule_sampler("pt2", split=0.5, max_steps=8)
    assert mixes(s, 8) == [{"V": 10}, {"A": 10}, {"V": 10}, {"V": 10}] + [{"AV": 10}] * 4
    # each modality's stream runs on across the phase switch: every AV item once before repeats
    av = [i for step in range(4, 8) for i, v in s.global_batch(step) if v == "AV"]
    assert sorted(av[:40]) == sorted(i for i, _ in s.pools["AV"])


def test_schedules_are_deterministic_and_resume_mid_phase_and_across_the_switch():
    def run(schedule, consumed=0, seed_rank=1):
        s = schedule_sampler(schedule, dp_rank=seed_rank, dp_size=2, consumed=consumed)
        out = []
        while s.consumed_samples < 10 * 10:  # 10 steps of 10 (epochs of 13 steps: one call)
            out += list(s)
        return out

    for schedule in ("pt1", "pt2"):
        full = run(schedule)
        assert full == run(schedule) and len(full) == 13
        for stop in (2, 4, 5):  # mid phase 1, at the switch, mid phase 2
            assert run(schedule, consumed=stop * 10) == full[stop:], (schedule, stop)
    assert run("pt1") != run("pt2")


def test_schedule_errors_name_the_key():
    with pytest.raises(UserError, match="modality_schedule='pt3'"):
        schedule_sampler("pt3")
    with pytest.raises(UserError, match="set trainer.max_steps"):
        schedule_sampler("pt1", max_steps=None)
    with pytest.raises(UserError, match="modality_schedule_split=1.5"):
        schedule_sampler("pt2", split=1.5)
    with pytest.raises(UserError, match="has a AV phase but there are no AV items"):
        MATBatchSampler(samples(20, 20, 0), {"V": 0.5, "A": 0.5}, 10, 5, schedule="pt1", max_steps=4)
