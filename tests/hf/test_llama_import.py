"""`import-hf`: a Hugging Face LLaMA folder becomes a dist checkpoint whose megatron logits are
the HF model's (GQA and MHA), in every weight format; HF -> megatron -> HF is exact."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_avllm.hf import hf_model  # noqa: F401  (transformers models before megatron's CPU shims)
from tests.hf.worker import tiny_cfg, tiny_hf_llama

TOL = 1e-4
MHA = ("llm.num_query_groups=4",)  # the tiny LLM has 4 heads; the default config uses 2 KV groups


def _megatron_text_logits(ckpt, cfg, ids):
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    model = build_model(cfg).eval()
    checkpoint.load(ckpt, model, allow_missing=checkpoint.NOT_IN_LLM_CHECKPOINT)
    with torch.no_grad():
        return model(ids, runtime_gather_output=True)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("overrides", [(), MHA], ids=["gqa", "mha"])
def test_imported_checkpoint_gives_hf_logits(tmp_path, dist1, ids, overrides):
    from nemo_avllm.hf.import_hf import import_hf

    hf = tiny_hf_llama(tmp_path / "hf", overrides)
    cfg = tiny_cfg(overrides)
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt", cfg)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta  # a dist checkpoint folder
    with torch.no_grad():
        ref = hf(ids).logits
    got = _megatron_text_logits(out, cfg, ids)
    diff = (got - ref).abs().max().item()
    print(f"import {overrides or 'gqa'}: max |megatron - HF| = {diff:.2e} (logits up to {ref.abs().max():.2f})")
    assert diff <= TOL


def test_rope_layout_is_not_permuted(tmp_path, dist1, ids):
    """The parity above is sensitive to RoPE: importing q/k in Meta's interleaved row order (what
    HF's conversion script undoes) gives different logits. So megatron (rotary_interleaved=False)
    and HF agree on rotate_half with the rows as HF stores them."""
    from nemo_avllm.config import to_dict
    from nemo_avllm.hf import llama_bridge
    from nemo_avllm.model.weight_files import HFWeights
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.llm import LLMConfig
    from nemo_avllm.model.provider import build_model

    hf = tiny_hf_llama(tmp_path / "hf")
    cfg = tiny_cfg()
    llm = LLMConfig.from_dict(to_dict(cfg.llm))
    weights = HFWeights(tmp_path / "hf")
    hn = llm.hidden_size // llm.num_attention_heads

    def interleaved(name):
        t = weights.get(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # HF half-split -> Meta interleaved
            heads = t.shape[0] // hn
            t = t.reshape(heads, 2, hn // 2, -1).transpose(1, 2).reshape(t.shape)
        return t

    with torch.no_grad():
        ref = hf(ids).logits
    diffs = {}
    for label, get in (("as stored", weights.get), ("interleaved", interleaved)):
        model = build_model(cfg).eval()
        parallel_layout.load_full_state_dict(model, llama_bridge.to_megatron(llm, get), strict=False)
        with torch.no_grad():
            diffs[label] = (model(ids, runtime_gather_output=True) - ref).abs().max().item()
    print(f"RoPE: {diffs}")
    assert diffs["as stored"] <= TOL and diffs["interleaved"] > 100 * TOL


def test_sharded_bin_and_safetensors_import_the_same(tmp_path, dist1):
    """`pytorch_model-*.bin` shards with an index (read with weights_only=True) and sharded
    safetensors give tensor-equal checkpoints."""
    from safetensors.torch import load_file

    from nemo_avllm.hf.import_hf import import_hf
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    tiny_hf_llama(tmp_path / "st", max_shard_size="60KB")
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        part = load_file(str(tmp_path / "st" / shard))
        torch.save(part, tmp_path / "bin" / name)
        weight_map.update({k: name for k in part})
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    cfg = tiny_cfg()
    tensors = []
    for fmt in ("st", "bin"):
        ckpt = import_hf(tmp_path / fmt, tmp_path / f"ckpt_{fmt}", cfg)
        model = build_model(cfg)
        checkpoint.load(ckpt, model, allow_missing=checkpoint.NOT_IN_LLM_CHECKPOINT)
        tensors.append({n: t.detach().clone() for n, t in parallel_layout.local_tensors(model).items() if n.startswith("llm.")})
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) == 2 + 4 * 6 + 1
    assert all(torch.equal(tensors[0][n], tensors[1][n]) for n in tensors[0])


def test_hf_megatron_hf_is_exact(tmp_path, dist1, tokenizer_dir, ids):
    """import-hf then export-hf (llm_only) returns the very same tensors, a plain
    `LlamaForCausalLM` folder with the same logits."""
    import shutil

    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from nemo_avllm.hf.export_hf import export_hf
    from nemo_avllm.hf.import_hf import import_hf

    hf = tiny_hf_llama(tmp_path / "hf")
    for f in tokenizer_dir.iterdir():  # a complete HF folder: weights + tokenizer
        shutil.copy(f, tmp_path / "hf" / f.name)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt", tiny_cfg())
    out = export_hf(ckpt, tmp_path / "out", llm_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["llm"]
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(out / "llm" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    back = LlamaForCausalLM.from_pretrained(out / "llm").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
