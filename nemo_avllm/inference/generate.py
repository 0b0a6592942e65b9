"""Greedy decoding with the megatron AVLLM (TP=1 or TP>1 with gathered logits; one pipeline stage).

Encoders run once per batch; every decoding step re-runs the LLM over the sequence with the
cached encoder features (no KV cache: the demo and tests answer in a few tokens)."""

from __future__ import annotations

import re

import torch

from nemo_avllm.data.conversation import ConversationTemplate, tokenize_conversation
from nemo_avllm.model.avllm import EncoderFeatures


def _check_single_stage():
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("generation runs on one pipeline stage; export to Hugging Face or use PP=1")


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], video=None, audio=None, features: EncoderFeatures | None = None,
                    eos_id: int = 2, max_new_tokens: int = 8) -> list[list[int]]:
    """New token ids per prompt (stops at `eos_id`, which is not returned)."""
    _check_single_stage()
    was_training = model.training
    model.eval()
    try:
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        total = max(lengths) + max_new_tokens
        ids = torch.zeros(b, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        if features is None:
            features = model.encode(ids, video, audio)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for _ in range(max_new_tokens):
            n = max(lengths)
            logits = model(ids[:, :n], features=features, runtime_gather_output=True)  # [b, n, v]
            for i in range(b):
                if done[i]:
                    continue
                nxt = int(logits[i, lengths[i] - 1].float().argmax())
                if nxt == eos_id:
                    done[i] = True
                    continue
                out[i].append(nxt)
                ids[i, lengths[i]] = nxt
                lengths[i] += 1
            if all(done):
                break
        return out
    finally:
        model.train(was_training)


def prompt_ids(turns: list[dict], tokenizer, layout, template: ConversationTemplate = ConversationTemplate()) -> list[int]:
    """Token ids of a conversation that ends with a human turn, followed by "Assistant:"."""
    return tokenize_conversation(turns, tokenizer, layout, template, add_generation_prompt=True).input_ids


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles: what closed-vocabulary answers are compared on."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))
