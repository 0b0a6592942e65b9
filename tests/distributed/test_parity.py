"""Tensor and pipeline parallelism give the single-process numbers (issue: TP/PP parity).

A 1-process TP=1/PP=1 reference run saves weights, losses, logits and grads; TP=2, PP=2 and
TP2xPP2 runs load the same weights into their shards and run megatron-core's schedules over
4 micro-batches mixing <VIS>, <AUD>, <AUD_VIS> samples."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, torchrun

pytestmark = pytest.mark.distributed
WORKER = REPO / "tests" / "distributed" / "parity_worker.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    torchrun(WORKER, 1, "--mode", "reference", "--dir", str(d))
    assert (d / "weights.pt").is_file() and (d / "reference.pt").is_file()
    return d


@pytest.mark.parametrize("tp,pp,first", [(2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 1)],
                         ids=["tp2", "pp2", "tp2xpp2", "pp2_first_stage_1_layer"])
def test_parallel_run_matches_single_process(reference, tp, pp, first):
    extra = ("--first-stage-layers", str(first)) if first else ()
    torchrun(WORKER, tp * pp, "--mode", "compare", "--tp", str(tp), "--pp", str(pp), "--dir", str(reference), *extra)
    report = json.loads((reference / f"report_tp{tp}_pp{pp}{f'_first{first}' if first else ''}.json").read_text())
    ranks = report["ranks"]
    assert len(ranks) == tp * pp
    if first:  # the first stage (encoders + projectors) carries fewer LLM layers
        assert [r["num_layers"] for r in ranks] == [first, 4 - first]
    # every trainable tensor of the reference is produced by some rank, and no rank has extras
    assert report["uncovered_reference_grads"] == []
    assert all(r["missing_grads"] == [] for r in ranks)
    # projectors (3 x weight+bias) + embedding + 4 layers x 6 + final norm + output layer
    assert report["trainable_reference_grads"] == 6 + 1 + 4 * 6 + 2
    for r in ranks:
        assert r["num_grads"] > 0
        assert r["grad_max_abs_diff"] <= TOL * max(1.0, r["grad_max_ref"]), r
    last_stage = [r for r in ranks if "loss_max_abs_diff" in r]
    assert len(last_stage) == tp  # the TP ranks of the last pipeline stage
    for r in last_stage:
        assert r["loss_max_abs_diff"] <= TOL
        assert r["logit_max_abs_diff"] <= TOL
