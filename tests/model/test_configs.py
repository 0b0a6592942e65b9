"""Named model configs build (7B/13B on the meta device) and bad parallel settings fail early."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm import config
from nemo_avllm.model.llm import LLMConfig
from nemo_avllm.model.provider import build_model, megatron_config


def test_vicuna7b_builds_on_meta_with_published_parameter_count(dist1):
    model = build_model(config.load_model("vicuna7b"), meta=True)
    llm_params = sum(p.numel() for p in model.llm.parameters())
    assert llm_params == 6_738_415_616  # LLaMA-2 7B / Vicuna-7B v1.5
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert model.layout.num_frames == 32 and model.layout.num_patches == 256 and model.layout.num_audio_segments == 4
    # projectors into the LLM width: ViT-L/14 width 1024, HTSAT-tiny 768 (laion_clap 630k-audioset)
    assert model.proj_temporal.linear.weight.shape == (4096, 1024)
    assert model.proj_spatial.linear.weight.shape == (4096, 1024)
    assert model.proj_audio.linear.weight.shape == (4096, 768)
    assert len(model.llm.decoder.layers) == 32


def test_vicuna13b_parameter_count_by_shape_arithmetic():
    llm = LLMConfig.from_dict(config.to_dict(config.load_model("vicuna13b").llm))
    assert llm.num_layers == 40 and llm.hidden_size == 5120
    assert llm.num_parameters() == 13_015_864_320  # LLaMA-2 13B


def test_shape_arithmetic_matches_the_built_model(dist1):
    cfg = config.load_model("vicuna7b")
    model = build_model(cfg, meta=True)
    assert LLMConfig.from_dict(config.to_dict(cfg.llm)).num_parameters() == sum(p.numel() for p in model.llm.parameters())


@pytest.mark.parametrize(
    "override,message",
    [
        ("tensor_model_parallel_size=3", "must divide num_attention_heads"),
        ("pipeline_model_parallel_size=3", "must divide num_layers"),
        ("llm.num_query_groups=3", "not divisible by num_query_groups"),
        ("params_dtype=fp8", "model.params_dtype"),
    ],
)
def test_invalid_parallel_settings_are_refused_with_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        megatron_config(config.load_model("vicuna7b", [override]))


def test_unknown_llm_key_is_named():
    with pytest.raises(ValueError, match="unknown keys.*hidden"):
        LLMConfig.from_dict({"hidden": 3})
