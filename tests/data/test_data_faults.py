"""Data faults of a long run (issue 24): shard names that would become shell or leave the shard
folder, a MAT modality that rounds to zero per batch, and error hints that name keys which exist."""

from __future__ import annotations

import json
import re

import pytest

from nemo_avllm.errors import UserError
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["V-000000.tar; touch {marker}", "../outside.tar", "/etc/passwd", "V-$(id).tar"])
def test_shard_names_are_checked_before_use(tmp_path, name):
    from nemo_avllm.data.shards import open_shards

    marker = tmp_path / "marker"
    (tmp_path / "shards.json").write_text(json.dumps({"shards": [{"file": name.format(marker=marker), "count": 1}]}))
    for spec in (str(tmp_path), f"pipe:cat {tmp_path}"):
        with pytest.raises(UserError, match=r"shards.json: refused shard name"):
            open_shards(spec)
    assert not marker.exists()


def test_a_modality_that_rounds_to_zero_per_batch_is_given_one_or_refused():
    from nemo_avllm.data.mat_sampler import ModalityPlan

    ratios = {"V": 0.5, "A": 0.2, "AV": 0.3}  # the stage-1 defaults
    assert ModalityPlan.build(ratios, {"V": 9, "A": 9, "AV": 9}, 3).counts(0) == {"V": 1, "A": 1, "AV": 1}
    assert ModalityPlan.build({"V": 0.9, "A": 0.05, "AV": 0.05}, {"V": 9, "A": 9, "AV": 9}, 8).counts(0)["A"] == 1
    with pytest.raises(UserError, match=r"modality A \(ratio 0\.2\) rounds to 0 samples in a global batch of 2"):
        ModalityPlan.build(ratios, {"V": 9, "A": 9, "AV": 9}, 2)


_COMMAND = re.compile(r"avllm ([a-z][a-z-]*)((?:[ \t]+[A-Za-z_][\w.]*=[^\s`'\"]*)+)")


def test_every_key_an_error_message_suggests_is_a_key_of_its_task():
    """`avllm TASK key=...` in any message or docstring: `key` must exist in TASK's config."""
    from omegaconf import OmegaConf

    from nemo_avllm import config
    from nemo_avllm.cli import TASKS

    bad = []
    for f in sorted((REPO / "nemo_avllm").rglob("*.py")):
        for task, args in _COMMAND.findall(f.read_text()):
            if task not in TASKS:
                continue
            cfg = OmegaConf.to_container(config.load(TASKS[task][1]), resolve=False)
            for key in re.findall(r"([A-Za-z_][\w.]*)=", args):
                if task == "launch" and re.match(r"stage\d\.", key):
                    continue  # passed through to that stage's `avllm train`
                node = cfg
                for part in key.split("."):
                    if not (isinstance(node, dict) and part in node):
                        bad.append(f"{f.relative_to(REPO)}: `avllm {task} ... {key}=`")
                        break
                    node = node[part]
    assert not bad, bad
