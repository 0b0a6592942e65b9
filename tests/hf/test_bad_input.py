"""Bad input is refused with an error that names what is wrong: missing shards, a config.json
that does not describe its weights (vocab, heads, hidden size), an HF config that is not the
model config, a tokenizer without the modality tokens, an export over a non-empty folder or
without the weights it needs. And no `torch.load` in the project can run pickled code."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from nemo_avllm.hf import hf_model
from nemo_avllm.hf.llama_bridge import ConfigMismatchError
from tests.conftest import REPO
from tests.hf.worker import tiny_cfg, tiny_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "hf"
    tiny_hf_llama(d, max_shard_size="60KB")
    return d


def _edited(hf_dir, tmp_path, **changes):
    d = tmp_path / "edited"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _import(src, tmp_path, overrides=()):
    from nemo_avllm.hf.import_hf import import_hf

    return import_hf(src, tmp_path / "ckpt", tiny_cfg(overrides))


def test_missing_shard(hf_dir, tmp_path):
    d = _edited(hf_dir, tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 are missing: \['{shard.name}'\].*download the complete checkpoint"):
        _import(d, tmp_path)
    assert not (tmp_path / "ckpt").exists()


def test_no_weights_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="holds no weights: expected one of model.safetensors"):
        from nemo_avllm.model.weight_files import HFWeights

        HFWeights(tmp_path / "empty")


@pytest.mark.parametrize(
    "changes,overrides,message",
    [
        ({"vocab_size": 600}, ["llm.vocab_size=600"],
         r"model.embed_tokens.weight has shape \(512, 64\), but config.json \(vocab_size=600, hidden_size=64\) implies \(600, 64\)"),
        ({"num_key_value_heads": 4}, ["llm.num_query_groups=4"],
         r"k_proj.weight has shape \(32, 64\), but config.json \(num_key_value_heads=4 x head_dim=16, hidden_size=64\) implies \(64, 64\)"),
        ({"hidden_size": 128, "head_dim": 32}, ["llm.hidden_size=128"],
         r"model.embed_tokens.weight has shape \(512, 64\), but config.json \(vocab_size=512, hidden_size=128\) implies \(512, 128\)"),
    ],
    ids=["vocab", "kv-heads", "hidden"],
)
def test_config_that_does_not_describe_the_weights(hf_dir, tmp_path, changes, overrides, message):
    with pytest.raises(ConfigMismatchError, match=message):
        _import(_edited(hf_dir, tmp_path, **changes), tmp_path, overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["llm.num_attention_heads=8"], r"num_attention_heads=4 does not match model.llm.num_attention_heads=8"),
        (["llm.vocab_size=32000"], r"vocab_size=512 does not match model.llm.vocab_size=32000"),
        (["llm.num_layers=2"], r"num_hidden_layers=4 does not match model.llm.num_layers=2"),
        (["llm.rotary_base=500000"], r"rope_theta=10000.0 does not match model.llm.rotary_base=500000"),
        (["llm.layernorm_epsilon=1e-6"], r"rms_norm_eps=1e-05 does not match model.llm.layernorm_epsilon=1e-06"),
    ],
    ids=["heads", "vocab", "layers", "rope-theta", "eps"],
)
def test_hf_config_is_not_the_model_config(hf_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigMismatchError, match=message):
        _import(hf_dir, tmp_path, overrides)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type='llama3'"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ],
    ids=["model-type", "rope-scaling", "tied"],
)
def test_not_this_architecture(hf_dir, tmp_path, changes, message):
    with pytest.raises(ConfigMismatchError, match=re.escape(message)):
        _import(_edited(hf_dir, tmp_path, **changes), tmp_path)


def test_tokenizer_without_modality_tokens(tokenizer):
    config = hf_model.AVLLMConfig(num_frames=4, num_patches=16, num_audio_segments=2,
                                  vis_token_id=512, aud_token_id=513, aud_vis_token_id=514)
    turns = [{"from": "human", "value": "<VIS> What colour?"}]
    with pytest.raises(ValueError, match=r"no special token <VIS> with id 512 .*use the tokenizer exported with the model"):
        hf_model.encode_conversation(tokenizer, turns, config)
    with pytest.raises(ValueError, match=r"has no token id for \['<AUD>', '<AUD_VIS>'\]"):
        _ = hf_model.AVLLMConfig(vis_token_id=1).modality_token_ids


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory, dist1):
    from nemo_avllm.hf.import_hf import import_hf

    return import_hf(hf_dir, tmp_path_factory.mktemp("imported") / "ckpt", tiny_cfg())


def test_export_refuses_a_non_empty_folder(imported, tmp_path, tokenizer_dir):
    from nemo_avllm.hf.export_hf import export_hf

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; .*overwrite=true"):
        export_hf(imported, out, tokenizer=str(tokenizer_dir), llm_only=True)
    assert (out / "keep.txt").read_text() == "mine"
    export_hf(imported, out, tokenizer=str(tokenizer_dir), llm_only=True, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["llm"]


def test_export_of_an_llm_only_checkpoint_needs_llm_only(imported, tmp_path, tokenizer_dir):
    from nemo_avllm.hf.export_hf import MissingWeightsError, export_hf

    with pytest.raises(MissingWeightsError, match=r"lacks 6 projector tensors.*export it with llm_only=true"):
        export_hf(imported, tmp_path / "out", tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match="no tokenizer: give tokenizer="):
        export_hf(imported, tmp_path / "out", llm_only=True)
    assert not (tmp_path / "out").exists()


def test_loading_an_incomplete_export(tmp_path):
    (tmp_path / "x").mkdir()
    hf_model.AVLLMConfig(vis_token_id=1, aud_token_id=2, aud_vis_token_id=3).save_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="llm is missing: an AVLLM folder holds llm/, vision/ and audio/"):
        hf_model.AVLLMForConditionalGeneration.from_pretrained(tmp_path / "x")


def test_every_torch_load_is_weights_only():
    """No torch.load in the project may unpickle arbitrary objects."""
    offenders = []
    for path in list((REPO / "nemo_avllm").rglob("*.py")) + list((REPO / "tests").rglob("*.py")) + list((REPO / "scripts").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert offenders == []
