"""Loss on assistant response tokens only (paper Eq. 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_avllm import modality
from nemo_avllm.data.collate import collate_tokens
from nemo_avllm.data.conversation import ConversationError, tokenize_conversation
from nemo_avllm.model.provider import build_model
from nemo_avllm.training.step import loss_func

CONV = [
    {"from": "human", "value": "What colour is the square? <VIS>"},
    {"from": "gpt", "value": "The square is red."},
    {"from": "human", "value": "<AUD> Describe the sound."},
    {"from": "gpt", "value": "A high tone plays."},
    {"from": "human", "value": "Is the sound synchronous with the motion? <AUD_VIS>"},
    {"from": "gpt", "value": "Yes, the beeps match the bounces."},
]


@pytest.fixture(scope="module")
def model(dist1):
    from nemo_avllm import config

    torch.manual_seed(0)
    return build_model(config.load_model("tiny"))


def _batch(model, tokenizer, conv=CONV):
    sample = tokenize_conversation(conv, tokenizer, model.layout)
    return sample, collate_tokens([sample])


def _media(model, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, model.layout.num_frames, 3, 64, 64, generator=g),
            0.1 * torch.randn(1, model.layout.num_audio_segments, 480000, generator=g))


def _loss(model, batch, video, audio):
    out = model(batch["input_ids"], labels=batch["labels"], video=video, audio=audio)
    s, n, _ = loss_func(batch["loss_mask"], out)
    return s / n


def test_only_responses_and_their_eos_carry_labels(model, tokenizer):
    sample, _ = _batch(model, tokenizer)
    trained = [i for i, l in zip(sample.input_ids, sample.labels) if l != modality.IGNORE_INDEX]
    text = tokenizer.decode(trained)
    for turn in CONV[1::2]:
        assert turn["value"] in text
    assert text.count(tokenizer.eos_token) == 3
    for turn in CONV[0::2]:
        assert "colour" not in text and "Describe" not in text
    assert "video assistant" not in text and "Human" not in text
    # every placeholder position and the system prompt are unlabelled
    for i, l in zip(sample.input_ids, sample.labels):
        if i in modality.PLACEHOLDER_IDS:
            assert l == modality.IGNORE_INDEX
    # the tokens of each modality token are all there
    for pid, n in ((modality.TEMPORAL_ID, 2 * 4), (modality.SPATIAL_ID, 2 * 16), (modality.AUDIO_ID, 2 * 2)):
        assert sample.input_ids.count(pid) == n


def test_editing_prompt_or_modality_does_not_move_the_loss_positions(model, tokenizer):
    sample, batch = _batch(model, tokenizer)
    video, audio = _media(model, 0)
    base = _loss(model, batch, video, audio)

    # edit one token inside the first human turn (same length)
    human_pos = [i for i, l in enumerate(sample.labels) if l == modality.IGNORE_INDEX and sample.input_ids[i] > 2]
    edited = batch["input_ids"].clone()
    edited[0, human_pos[5]] = (edited[0, human_pos[5]] + 7) % 400 + 3
    b2 = collate_tokens([type(sample)(edited[0, : len(sample.input_ids)].tolist(), sample.labels)])
    assert torch.equal(b2["loss_mask"], batch["loss_mask"])

    # other video and audio: other modality embeddings, same loss positions, different loss value
    video2, audio2 = _media(model, 1)
    loss_other_media = _loss(model, batch, video2, audio2)
    assert torch.equal(batch["loss_mask"], collate_tokens([sample])["loss_mask"])
    assert not torch.isclose(loss_other_media, base)


def test_editing_an_assistant_token_changes_the_loss(model, tokenizer):
    sample, batch = _batch(model, tokenizer)
    video, audio = _media(model, 0)
    base = _loss(model, batch, video, audio)
    resp = [i for i, l in enumerate(sample.labels) if l != modality.IGNORE_INDEX and l != tokenizer.eos_token_id]
    ids, labels = list(sample.input_ids), list(sample.labels)
    ids[resp[2]] = labels[resp[2]] = (ids[resp[2]] + 11) % 400 + 3
    b2 = collate_tokens([type(sample)(ids, labels)])
    assert torch.equal(b2["loss_mask"], batch["loss_mask"])
    assert not torch.isclose(_loss(model, b2, video, audio), base)


def test_loss_is_cross_entropy_over_response_positions_only(model, tokenizer):
    _, batch = _batch(model, tokenizer)
    video, audio = _media(model, 0)
    logits = model(batch["input_ids"], video=video, audio=audio, runtime_gather_output=True)  # [b, s, v]
    mask = batch["loss_mask"]
    expected = F.cross_entropy(logits[mask].float(), batch["labels"][mask])
    torch.testing.assert_close(_loss(model, batch, video, audio), expected, rtol=1e-5, atol=1e-5)


def test_bad_conversations_are_refused(model, tokenizer):
    with pytest.raises(ConversationError, match="empty conversation"):
        tokenize_conversation([], tokenizer, model.layout)
    with pytest.raises(ConversationError, match="roles must alternate"):
        tokenize_conversation([CONV[0], CONV[0]], tokenizer, model.layout)
    with pytest.raises(ConversationError, match="human turns"):
        tokenize_conversation([CONV[0], {"from": "gpt", "value": "<VIS>"}], tokenizer, model.layout)


def test_truncation_cuts_the_last_response_and_never_a_prompt(model, tokenizer):
    full = tokenize_conversation(CONV, tokenizer, model.layout)
    cut = tokenize_conversation(CONV, tokenizer, model.layout, max_length=len(full.input_ids) - 3)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 3
    assert cut.labels[-1] != modality.IGNORE_INDEX
    # a cut inside the third prompt goes back to the end of the second response
    third_prompt = full.input_ids.index(modality.TEMPORAL_ID, full.input_ids.index(modality.AUDIO_ID))
    cut2 = tokenize_conversation(CONV, tokenizer, model.layout, max_length=third_prompt + 2)
    assert cut2.input_ids[-1] == tokenizer.eos_token_id
    assert modality.AUDIO_ID in cut2.input_ids and cut2.input_ids.count(modality.TEMPORAL_ID) == 4
    with pytest.raises(ConversationError, match="first prompt alone"):
        tokenize_conversation(CONV, tokenizer, model.layout, max_length=10)
