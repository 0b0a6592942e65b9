"""The demo's scoring: every part of a reasoning answer is scored on its own, and the bars."""

from __future__ import annotations

import random

from omegaconf import OmegaConf

from nemo_avllm.demo import clips, scoring, steps


def _spec(**kw):
    spec = clips.draw_spec(0, random.Random(0), p_no_audio=0)
    return clips.ClipSpec(**{**spec.__dict__, **kw})


def test_reasoning_response_is_made_of_its_scored_parts():
    spec = _spec(shape_late=True, sound_late=False)
    assert spec.response("sync") == "The shape appears half-way and the sound starts at the start, so no."
    words = "shape appears half way and sound starts at start so no".split()
    assert all(scoring._says(words, p) for p in spec.parts("sync").values())
    # a wrong observation is caught even when the verdict happens to be right
    wrong = "shape appears at start and sound starts at start so no".split()
    assert not scoring._says(wrong, spec.parts("sync")["shape timing"])
    assert scoring._says(wrong, spec.parts("sync")["sound timing"]) and scoring._says(wrong, spec.parts("sync")["verdict"])
    assert spec.parts("colour") == {}


def test_table_has_a_row_per_part_and_bars_name_what_misses():
    results = {
        "accuracy": {"sync|<AUD_VIS>": 0.5, "pitch|<VIS>": 0.9, "pitch|<AUD>": 1.0, "motion|<VIS>": 0.85,
                     "colour|<VIS>": 0.94},
        "counts": {"sync|<AUD_VIS>": 10, "pitch|<VIS>": 10, "pitch|<AUD>": 10, "motion|<VIS>": 10, "colour|<VIS>": 10},
        "parts": {"sync|shape timing|<AUD_VIS>": 1.0, "sync|sound timing|<AUD_VIS>": 0.5, "sync|verdict|<AUD_VIS>": 0.5},
    }
    md = scoring.table(results)
    assert "| ↳ sync: sound timing | 50% | – | – | 50% (n=10) |" in md
    assert "| ↳ sync: shape timing | 50% | – | – | 100% (n=10) |" in md
    bars = OmegaConf.create({"sync": 0.9, "motion": 0.8, "other": 0.95, "vis_only_audio_band": 0.15})
    misses = scoring.check_bars(results, bars)
    assert [m.split(":")[0] for m in misses] == ["colour|<VIS>", "pitch|<VIS>", "sync|<AUD_VIS>"]


def test_out_dir_is_reused_with_the_same_settings_and_refused_with_another_seed(tmp_path):
    import pytest

    cfg = OmegaConf.create({"seed": 0, "model": "tiny_demo", "num_train": 8, "num_eval": 2, "train_manifest": None,
                            "stage2_manifest": None, "eval_manifest": None, "tokenizer_vocab": 512})
    steps.check_out_dir(tmp_path, cfg)
    steps.check_out_dir(tmp_path, cfg)  # a rerun reuses the folder
    cfg.seed = 1
    with pytest.raises(ValueError, match=r"seed: 0 there, 1 now.*choose another out_dir"):
        steps.check_out_dir(tmp_path, cfg)
