"""The HF export's tokenizer carries a `chat_template` that gives the prompt `avllm generate`
builds (issue 23): `tokenizer.apply_chat_template` on the exported tokenizer, its modality
tokens expanded, equals the ids of the training template (`data.conversation`)."""

from __future__ import annotations

import pytest

from nemo_avllm import modality

CONVERSATIONS = [
    [{"from": "human", "value": "<AUD_VIS> What is the man doing?"}],
    [{"from": "human", "value": "<AUD>\nWould you call the tone high or low?"}],
    [{"from": "human", "value": "<VIS> What colour is the car?"}, {"from": "gpt", "value": "It is red."},
     {"from": "human", "value": "Is it moving?"}],
]


@pytest.fixture(scope="module")
def exported_tokenizer(tokenizer_dir, tmp_path_factory):
    """The tokenizer folder as `avllm export-hf` writes it (`export_hf.hf_tokenizer`), reloaded."""
    from transformers import AutoTokenizer

    from nemo_avllm.data.tokenizer import load_tokenizer
    from nemo_avllm.hf.export_hf import hf_tokenizer

    folder = tmp_path_factory.mktemp("export")
    tok = load_tokenizer(tokenizer_dir)
    ids = hf_tokenizer(tok)
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder), ids


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_apply_chat_template_is_the_generate_prompt(exported_tokenizer, turns):
    from nemo_avllm.data.conversation import tokenize_conversation

    hf, ids = exported_tokenizer
    layout = modality.TokenLayout(num_frames=2, num_patches=3, num_audio_segments=2)
    want = tokenize_conversation(turns, hf, layout, add_generation_prompt=True).input_ids  # what generate feeds the model
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if hasattr(got, "keys") else got
    token_of = {v: k for k, v in ids.items()}
    expanded = [p for i in got for p in (layout.expansion(token_of[i]) if i in token_of else [i])]
    assert expanded == want
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s> A chat between a curious human and a video assistant. Human:") and text.endswith(" Assistant:")
