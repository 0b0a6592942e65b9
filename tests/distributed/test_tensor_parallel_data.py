"""Sequence-parallel projectors and data read once per TP group (issue 9), on 2 gloo processes."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, torchrun

pytestmark = pytest.mark.distributed
WORKER = REPO / "tests" / "distributed" / "tp_worker.py"


def test_projectors_keep_the_batch_under_sequence_parallel_at_tp2():
    torchrun(WORKER, 2, "--mode", "sp")


def test_micro_batch_is_read_once_per_tp_group_and_stages_get_what_they_use():
    torchrun(WORKER, 2, "--mode", "broadcast")


def test_projector_weights_are_the_same_at_tp2_with_cpu_and_gpu_initialisation():
    torchrun(WORKER, 2, "--mode", "init")
