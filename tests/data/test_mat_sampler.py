"""Modality-Augmented Training batches: exact ratios, determinism, DP sharding, exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from nemo_avllm.data.manifest import Sample
from nemo_avllm.data.mat_sampler import MATBatchSampler, largest_remainder, normalise_ratios

RATIOS = {"V": 0.5, "A": 0.2, "AV": 0.3}


def samples(n_v=20, n_a=7, n_av=9):
    """Manifest samples of each modality class (the sampler reads only modality and audio)."""
    out = []
    for mod, n in (("V", n_v), ("A", n_a), ("AV", n_av)):
        for _ in range(n):
            i = len(out)
            out.append(Sample(id=f"{mod}{i}", video=f"/data/{i}.mp4", audio=None, conversations=[], modality=mod,
                              has_audio=mod != "V", media_id=f"m{i}"))
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


def test_dp_ranks_cover_each_global_batch_exactly_once():
    whole = MATBatchSampler(samples(), RATIOS, 12, 3, seed=3)
    full = global_batches(whole)
    parts = [global_batches(MATBatchSampler(samples(), RATIOS, 12, 3, dp_rank=r, dp_size=4, seed=3), 4)
             for r in range(4)]
    assert all(len(p) == len(full) for p in parts)
    for b, batch in enumerate(full):
        assert sum((p[b] for p in parts), []) == batch  # rank r holds slots [3r, 3r+3)
    s = MATBatchSampler(samples(), RATIOS, 12, 3, dp_rank=1, dp_size=2)
    assert all(len(mb) == 3 for mb in s) and len(MATBatchSampler(samples(), RATIOS, 12, 3, dp_rank=1, dp_size=2)) == 6
    with pytest.raises(ValueError, match="not a multiple of data-parallel size 4 x micro batch 2"):
        MATBatchSampler(samples(), RATIOS, 12, 2, dp_size=4)


@pytest.mark.parametrize("stop_after", [1, 5, 7])
def test_resume_from_consumed_samples_equals_uninterrupted_run(stop_after):
    def flat(sampler, epochs):
        return [mb for _ in range(epochs) for mb in sampler]

    G = 12
    ref = flat(MATBatchSampler(samples(), RATIOS, G, 2, dp_rank=1, dp_size=2, seed=5, derive_views=True), 3)
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
    assert global_batches(whole)[0][6:] == global_batches(other, 2)[0]
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        first.load_state_dict({"consumed_samples": 13})


def test_derive_views_adds_visual_and_audio_views_of_audio_visual_samples():
    data = samples(n_v=4, n_a=0, n_av=8)
    s = MATBatchSampler(data, RATIOS, 10, 1, derive_views=True)
    assert {m: len(p) for m, p in s.pools.items()} == {"V": 12, "A": 8, "AV": 8}
    assert {i for i, _ in s.pools["A"]} == {i for i, _ in s.pools["AV"]} == set(range(4, 12))
    for b in global_batches(s):
        assert Counter(v for _, v in b) == {"V": 5, "A": 2, "AV": 3}
    with pytest.warns(UserWarning, match="no samples of modality A"):
        MATBatchSampler(data, RATIOS, 10, 1, derive_views=False)


def test_no_ratios_means_natural_proportions_without_repeats():
    data = samples(n_v=6, n_a=2, n_av=4)
    s = MATBatchSampler(data, None, 4, 2, seed=1)
    items = [it for mb in s for it in mb]
    assert sorted(items) == [(i, d.modality) for i, d in enumerate(data)]  # one epoch = every sample once
