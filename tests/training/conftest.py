"""Real media for the training tests that go through the real loader (`avllm train`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def media_data(tmp_path_factory) -> dict[str, Path]:
    """ffmpeg-made H.264/AAC clips: `train` (stage-1 manifest of 8 clips) and `validation`
    (3 other clips with audio, each asked as <VIS>, <AUD> and <AUD_VIS>: 9 samples)."""
    from nemo_avllm.demo import clips

    root = tmp_path_factory.mktemp("media")
    paths = clips.generate(root, 12, 0, seed=4)
    lines = Path(paths["stage1"]).read_text().splitlines()
    train = root / "train.jsonl"
    train.write_text("\n".join(lines[:8]) + "\n")
    rows_of_clips = [json.loads(line) for line in Path(paths["clips"]).read_text().splitlines()][8:]
    held = [c for c in rows_of_clips if c["spec"]["has_audio"]][:3]
    assert len(held) == 3, "seed 4 should give 3 held-out clips with audio"
    rows = []
    for c in held:
        spec = clips.ClipSpec(**c["spec"])
        for tok in ("<VIS>", "<AUD>", "<AUD_VIS>"):
            rows.append({"id": f"{c['id']}{tok}", "video": c["video"],
                         "conversations": [{"from": "human", "value": f"{tok} Describe it."},
                                           {"from": "gpt", "value": clips.description(spec, tok)}]})
    validation = root / "validation.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": train, "validation": validation}


DROPOUT = {"model.llm.hidden_dropout": 0.1, "model.llm.attention_dropout": 0.1}


def media_run_args(exp_dir: Path, media: dict[str, Path], tokenizer_dir: Path) -> list[str]:
    """`avllm train` on the real media loader: 2 DataLoader workers decoding live, dropout on,
    validation and a top-1 checkpoint every 2 of 6 steps, TensorBoard on."""
    from tests.training import helpers

    return helpers.overrides(exp_dir, steps=6, every=2, **DROPOUT, **{
        "model.tokenizer": tokenizer_dir, "model.seq_length": 128,
        "model.data.train_manifest": media["train"], "model.data.validation_manifest": media["validation"],
        "model.data.num_workers": 2, "model.data.decode_backend": "cpu",
        "trainer.val_check_interval": 2,
        "exp_manager.create_tensorboard_logger": "true",
        "exp_manager.checkpoint_callback_params.save_top_k": 1})


@pytest.fixture(scope="session")
def media_reference_run(tmp_path_factory, media_data, tokenizer_dir) -> Path:
    """One uninterrupted run of `media_run_args` (its run folder): what the validation test reads
    and what the SIGTERM test's resumed run must reproduce."""
    from tests.training import helpers

    exp = tmp_path_factory.mktemp("media_ref")
    helpers.run(media_run_args(exp, media_data, tokenizer_dir), real_data=True)
    return exp / "run"
