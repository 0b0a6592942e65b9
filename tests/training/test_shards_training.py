"""`avllm train model.data.shards=...` on what `avllm prepare shards.out_dir=` wrote: the pt1
modality schedule step by step, and an exact resume after SIGKILL across the phase switch."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys

import pytest

from nemo_avllm.demo import clips
from tests.conftest import REPO
from tests.training import helpers
from tests.training.conftest import DROPOUT

STEPS = 6  # pt1 with split 0.5: steps 1-3 AV only, then V, A, V (V:A batches track 0.5:0.2)
MIX = {1: "AV", 2: "AV", 3: "AV", 4: "V", 5: "A", 6: "V"}
MIX_KEYS = ("V", "A", "AV")


@pytest.fixture(scope="module")
def shards(media_data, tmp_path_factory):
    """8 clips with sound: AV samples with per-modality `views`, V and A samples; prepared and
    sharded by the real CLI."""
    root = media_data["train"].parent
    rows_of_clips = [json.loads(line) for line in (root / "clips.jsonl").read_text().splitlines()][:8]
    rows = []
    for k, c in enumerate(rows_of_clips):
        spec = clips.ClipSpec(**c["spec"])

        def conv(tok):
            return [{"from": "human", "value": f"{tok} Describe it."},
                    {"from": "gpt", "value": clips.description(spec, tok)}]

        tok = ("<AUD_VIS>", "<VIS>", "<AUD>")[k % 3]
        row = {"id": c["id"], "video": str(root / c["video"]), "conversations": conv(tok)}
        if k % 3 == 0:
            row["views"] = {"V": conv("<VIS>"), "A": conv("<AUD>")}
        rows.append(row)
    d = tmp_path_factory.mktemp("shardtrain")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "nemo_avllm.cli", "prepare", f"input={d / 'train.jsonl'}",
                          f"out_dir={d / 'prep'}", "num_workers=1", f"shards.out_dir={d / 'shards'}",
                          "shards.samples_per_shard=2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    meta = json.loads((d / "shards" / "shards.json").read_text())
    assert meta["total"] == 8 and {e["modality"] for e in meta["shards"]} == {"V", "A", "AV"}
    return d / "shards"


def args(exp, shards, tokenizer_dir):
    return helpers.overrides(exp, steps=STEPS, every=2, **DROPOUT, **{
        "model.tokenizer": tokenizer_dir, "model.seq_length": 128,
        "model.global_batch_size": 2, "model.micro_batch_size": 1,
        "model.data.shards": shards, "model.data.derive_views": "true",
        "model.data.modality_schedule": "pt1", "model.data.modality_schedule_split": 0.5,
        "model.data.num_workers": 2, "model.data.decode_backend": "cpu"})


def test_shards_train_the_schedule_and_resume_exactly_across_the_switch(tmp_path, shards, tokenizer_dir):
    from nemo_avllm.training.callbacks import read_metrics

    _, out = helpers.run(args(tmp_path / "ref", shards, tokenizer_dir), real_data=True)
    assert "modality schedule pt1: steps [0, 3) AV, then V or A batches" in out
    ref = {m["step"]: m for m in read_metrics(tmp_path / "ref" / "run")}
    assert sorted(ref) == list(range(1, STEPS + 1))
    for step, mod in MIX.items():  # what the batch's tokens asked for, counted by the training step
        assert {k: ref[step][f"samples_{k}"] for k in MIX_KEYS} == {k: 2.0 * (k == mod) for k in MIX_KEYS}

    run = args(tmp_path / "b", shards, tokenizer_dir)
    proc = helpers.start(run, real_data=True)
    helpers.wait_for_step(tmp_path / "b" / "run", 3, proc)
    helpers.kill(proc, signal.SIGKILL)
    _, out = helpers.run(run, real_data=True)  # resume_if_exists: the last checkpoint (step 2 or 4)
    assert "Resuming training from checkpoint" in out
    got = helpers.losses_by_step(tmp_path / "b" / "run")
    assert max(got) == STEPS and min(got) in (3, 5), sorted(got)
    for step in got:  # bit-exact: same records, same RNG
        assert got[step] == ref[step]["reduced_train_loss"], (step, got[step], ref[step]["reduced_train_loss"])


@pytest.mark.parametrize("data_keys, message", [
    ([], "set one of model.data.train_manifest (a JSON Lines manifest) and model.data.shards"),
    (["model.data.train_manifest=x.jsonl", "model.data.shards=y"], "and model.data.shards (the folder or URL "
                                                                    "`avllm prepare shards.out_dir=` wrote) to train on, not both"),
    (["model.data.shards=/nonexistent/shards"], "model.data.shards: cannot read /nonexistent/shards/shards.json"),
])
def test_train_data_names_the_shards_key(data_keys, message, tokenizer_dir):
    from nemo_avllm import config
    from nemo_avllm.errors import UserError
    from nemo_avllm.training.data import TrainData

    cfg = config.load("stage1_pretrain", ["model=tiny", f"model.tokenizer={tokenizer_dir}", *data_keys])
    with pytest.raises(UserError, match=re.escape(message)):
        TrainData(cfg)
