"""Conversation template and tokenisation with loss labels (paper Fig. 4 and Eq. 6).

Vicuna v1.1 layout with the paper's roles and system prompt:

    <s>{system} Human: {instruction 1} Assistant: {response 1}</s>Human: {instruction 2} ...

Modality tokens inside human turns become runs of placeholder ids (`nemo_avllm.modality`).
Labels equal the input ids on assistant response tokens (and the `</s>` that ends each
response) and `IGNORE_INDEX` everywhere else: system prompt, human turns, role names,
modality positions and padding carry no loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nemo_avllm import modality

SYSTEM_PROMPT = "A chat between a curious human and a video assistant."
ROLES = {"human": "Human", "gpt": "Assistant"}
_MOD_SPLIT = re.compile("(" + "|".join(map(re.escape, modality.MODALITY_TOKENS)) + ")")


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training sample (message says why)."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass(frozen=True)
class ConversationTemplate:
    system_prompt: str = SYSTEM_PROMPT
    human_role: str = ROLES["human"]
    assistant_role: str = ROLES["gpt"]

    def prompt_text(self, turns: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (modality tokens kept), e.g. for logging and inference."""
        parts = [self.system_prompt]
        for turn in turns:
            role = self.human_role if turn["from"] == "human" else self.assistant_role
            parts.append(f" {role}: {turn['value'].strip()}")
            if turn["from"] == "gpt":
                parts.append("</s>")
        if add_generation_prompt:
            parts.append(f" {self.assistant_role}:")
        return "".join(parts)


def check_turns(turns, where: str = "conversation") -> None:
    """Roles must alternate human, gpt, human, ... and the conversation must not be empty."""
    if not turns:
        raise ConversationError(f"{where}: empty conversation; give at least one human and one gpt turn")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{where}[{i}]: each turn needs 'from' and 'value'")
        want = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != want:
            raise ConversationError(
                f"{where}[{i}]: role {turn['from']!r} where {want!r} was expected; roles must alternate human, gpt, ..."
            )
        if turn["from"] == "gpt" and modality.tokens_in(turn["value"]):
            raise ConversationError(f"{where}[{i}]: modality tokens belong in human turns, not in responses")


def tokenize_conversation(
    turns: list[dict],
    tokenizer,
    layout: modality.TokenLayout,
    template: ConversationTemplate = ConversationTemplate(),
    max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> TokenizedSample:
    """Token ids and labels of one conversation.

    With `add_generation_prompt` the last turn must be a human turn and the ids end with
    "Assistant:" (inference). With `max_length`, an over-long sample keeps whole earlier turns and
    cuts the last response it reaches; a sample whose prompt alone exceeds it raises."""
    if not add_generation_prompt:
        check_turns(turns)
    ids: list[int] = [tokenizer.bos_token_id]
    labels: list[int] = [modality.IGNORE_INDEX]

    def add(piece_ids: list[int], train: bool) -> None:
        ids.extend(piece_ids)
        labels.extend(piece_ids if train else [modality.IGNORE_INDEX] * len(piece_ids))

    def add_text(text: str, train: bool) -> None:
        if text:
            add(tokenizer.encode(text, add_special_tokens=False), train)

    prefix = template.system_prompt
    for turn in turns:
        if turn["from"] == "human":
            text = f"{prefix} {template.human_role}: {turn['value'].strip()} {template.assistant_role}:"
            for piece in _MOD_SPLIT.split(text):
                if piece in modality.MODALITY_TOKENS:
                    add(layout.expansion(piece), train=False)
                else:
                    add_text(piece.strip(" ") if piece.strip() else "", train=False)
        else:
            add_text(turn["value"].strip(), train=True)
            add([tokenizer.eos_token_id], train=True)
        prefix = ""

    truncated = False
    if max_length is not None and len(ids) > max_length:
        ids, labels, truncated = _truncate_last_response(ids, labels, max_length)
    return TokenizedSample(ids, labels, truncated)


def _truncate_last_response(ids: list[int], labels: list[int], max_length: int):
    """Keep at most `max_length` tokens, ending inside or at the end of a response.

    A cut that lands in a prompt moves back to the end of the previous response, so no sample
    ends with a question (or half a modality token) that has no answer."""
    kept = max_length
    if labels[kept - 1] == modality.IGNORE_INDEX:
        trained = [i for i in range(kept) if labels[i] != modality.IGNORE_INDEX]
        if not trained:
            raise ConversationError(
                f"sample has {len(ids)} tokens after modality expansion and its first prompt alone exceeds "
                f"max_length={max_length}; raise the max length or drop the sample"
            )
        kept = trained[-1] + 1
    return ids[:kept], labels[:kept], True
