"""The interop with training, end to end in real processes: stage 1 starts from an import-hf
checkpoint with one key (`model.restore_from`), and an intermediate training checkpoint (with
optimizer state) exports. Stage 1 freezes the LLM, so the exported LLM must be the imported one,
tensor for tensor, while the projectors moved."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm.hf import hf_model  # noqa: F401  (transformers models before megatron's CPU shims)
from tests.hf.worker import tiny_cfg, tiny_hf_llama
from tests.training import helpers


@pytest.mark.distributed
def test_stage1_from_import_then_export_an_intermediate_checkpoint(tmp_path, dist1, tokenizer_dir):
    from safetensors.torch import load_file

    from nemo_avllm.hf.export_hf import export_hf
    from nemo_avllm.hf.import_hf import import_hf

    tiny_hf_llama(tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "imported", tiny_cfg())
    helpers.run(helpers.overrides(tmp_path / "exp", steps=3, every=1, **{"model.restore_from": str(imported),
                                                                        "model.trainable": "[projectors]"}))
    ckpts = sorted(p for p in (tmp_path / "exp" / "run" / "checkpoints").glob("run--step_2") if (p / "metadata.json").is_file())
    assert ckpts, list((tmp_path / "exp" / "run" / "checkpoints").iterdir())
    out = export_hf(ckpts[0], tmp_path / "out", tokenizer=str(tokenizer_dir))

    source = load_file(str(tmp_path / "hf" / "model.safetensors"))
    llm = load_file(str(out / "llm" / "model.safetensors"))
    assert source.keys() == llm.keys() and all(torch.equal(source[k], llm[k]) for k in source)
    proj = load_file(str(out / "projectors.safetensors"))
    assert set(proj) == {f"{p}.{n}" for p in ("proj_temporal", "proj_spatial", "proj_audio") for n in ("weight", "bias")}
