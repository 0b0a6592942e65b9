"""KV-cache generation for the megatron AVLLM, on megatron-core's inference package.

What megatron-core does here: `StaticInferenceContext` holds the KV cache, our
`AVLLMInferenceWrapper` is a `GPTInferenceWrapper` (attention mask, position ids, context
windows, the forward step that advances the cache offset; TP runs gather the logits) and
`TorchSampling.sample_from_logits` samples (temperature, top-k, top-p). What it cannot do for
this model: its text-generation controller and engines take token ids only, while the AVLLM's
first positions are projected encoder features spliced into the embeddings (`nemo_avllm.modality`).
So the wrapper feeds the LLM `decoder_input` (the spliced embeddings of each context window) and
the small loop below replaces the controller: megatron's static-batching scheme (prefill up to
the shortest prompt, then one position per step, prompt tokens forced for longer prompts), plus
stop strings and streaming.

Runs on one pipeline stage at any TP (dist checkpoints reshard, so a PP checkpoint loads at PP=1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from nemo_avllm.model.avllm import EncoderFeatures


@dataclass
class SamplingConfig:
    """`conf/generate.yaml: sampling`. temperature 0 = greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int = 1234

    def __post_init__(self):
        if self.top_k > 0 and self.top_p > 0.0:
            raise ValueError("sampling: give top_k or top_p, not both (megatron's sampler applies one filter)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p} must be in [0, 1]")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
        self.stop = [str(s) for s in (self.stop or [])]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator, vocab_size: int) -> torch.Tensor:
    """[b, padded vocab] -> [b] token ids; ids of the padded vocabulary are never chosen."""
    from megatron.core.inference.sampling.torch_sampling import TorchSampling

    logits = logits.float().clone()  # megatron returns inference-mode tensors
    logits[:, vocab_size:] = float("-inf")
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return TorchSampling.sample_from_logits(logits, cfg.temperature, int(cfg.top_k), float(cfg.top_p),
                                            generator=generator)


def _wrapper_class():
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class AVLLMInferenceWrapper(GPTInferenceWrapper):
        """megatron's GPT inference wrapper with the multimodal splice: the forward step gets the
        embeddings of its context window (placeholders replaced by projected features)."""

        def prep_inference_input(self, prompts_tokens: torch.Tensor, features: EncoderFeatures | None = None):
            inp = super().prep_inference_input(prompts_tokens.clamp(min=0))
            inp["raw_tokens"] = prompts_tokens  # placeholders kept: they say which positions are features
            avllm = self.model
            inp["spliced"] = None
            if avllm.pre_process and bool((prompts_tokens < 0).any()):
                # [s, b, h] once per batch: placeholders replaced by their feature rows
                inp["spliced"] = avllm.embed(prompts_tokens, inp["position_ids"], features or EncoderFeatures())
            return inp

        def get_batch_for_context_window(self, inference_input, context_start_position, context_end_position):
            out = super().get_batch_for_context_window(inference_input, context_start_position, context_end_position)
            raw = inference_input["raw_tokens"][:, context_start_position:context_end_position]
            out["tokens"] = raw.clamp(min=0)
            out["decoder_input"] = None
            if self.model.pre_process:
                emb = self.model.llm.embedding(input_ids=out["tokens"], position_ids=out["position_ids"])  # [w, b, h]
                spliced = inference_input["spliced"]
                if spliced is not None:
                    is_feat = (raw < 0).transpose(0, 1).unsqueeze(-1)
                    emb = torch.where(is_feat, spliced[context_start_position:context_end_position], emb)
                out["decoder_input"] = emb
            return out

        def _forward(self, inference_input):
            return self.model.llm(
                inference_input["tokens"],
                inference_input["position_ids"],
                inference_input["attention_mask"],
                decoder_input=inference_input["decoder_input"],
                inference_context=self.inference_context,
                runtime_gather_output=True,
            )

    return AVLLMInferenceWrapper


@dataclass
class Generation:
    tokens: list[int]  # new ids, up to the one that completed a stop string; EOS excluded
    text: str
    finish: str  # "eos" | "stop" | "length"
    prompt_tokens: int


class MegatronGenerator:
    """Batched KV-cache generation with a megatron AVLLM (one pipeline stage, any TP)."""

    def __init__(self, model, tokenizer, vocab_size: int | None = None):
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "generation runs on one pipeline stage: launch with pipeline_model_parallel_size=1 (dist "
                "checkpoints reshard on load, so a PP checkpoint loads at PP=1), or export it with "
                "`avllm export-hf checkpoint=... out=...` and generate from the folder (hf=...)"
            )
        self.model = model
        self.tok = tokenizer
        self.vocab_size = vocab_size or model.cfg.llm.vocab_size
        self.layout = model.layout

    def encode(self, prompts: list[list[int]], video=None, audio=None) -> EncoderFeatures:
        """Encoder outputs for a batch of prompts: computed once, reused by every step (and turn)."""
        ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        dev = self.device
        with torch.no_grad():
            return self.model.encode(ids.to(dev), video.to(dev) if video is not None else None,
                                     audio.to(dev) if audio is not None else None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        video=None,
        audio=None,
        features: EncoderFeatures | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Generation]:
        """Answers to `prompts` (training-template ids with placeholders). `on_text(i, piece)` is
        called with each new piece of text of sample i as it is produced (streaming)."""
        from megatron.core import parallel_state as ps
        from megatron.core.inference.contexts import StaticInferenceContext

        if features is None:
            features = self.encode(prompts, video, audio)
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        total = max(lengths) + sampling.max_new_tokens
        tokens = torch.zeros(b, total, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        ctx = StaticInferenceContext(b, total)
        wrapper = _wrapper_class()(self.model, ctx)
        was_training = self.model.training
        wrapper.prep_model_for_inference()
        try:
            inp = wrapper.prep_inference_input(tokens, features)
            generator = torch.Generator(device=self.device).manual_seed(int(sampling.seed))
            out: list[list[int]] = [[] for _ in range(b)]
            stream = TextStream(self.tok, b, sampling.stop, on_text)
            finish = [None] * b
            start, end = 0, min(lengths)
            while end <= total - 1 and not all(finish):
                # the cache holds positions < start: only the new window runs through the LLM
                batch = wrapper.get_batch_for_context_window(inp, start, end)
                logits = wrapper.run_one_forward_step(batch)[:, -1]
                nxt = sample_next(logits, sampling, generator, self.vocab_size).to(self.device)
                if ps.get_tensor_model_parallel_world_size() > 1:  # every TP rank takes rank 0's tokens
                    torch.distributed.broadcast(nxt, ps.get_tensor_model_parallel_src_rank(),
                                                group=ps.get_tensor_model_parallel_group())
                nxt_host = nxt.tolist()
                for i in range(b):
                    if finish[i] or end < lengths[i]:
                        continue  # done, or still reading its prompt (the prompt token stays)
                    t = int(nxt_host[i])
                    if t == self.tok.eos_token_id:
                        finish[i] = "eos"
                        continue
                    tokens[i, end] = t
                    out[i].append(t)
                    if stream.push(i, t):
                        finish[i] = "stop"
                    if len(out[i]) >= sampling.max_new_tokens and finish[i] is None:
                        finish[i] = "length"
                start, end = end, end + 1
            stream.flush()
            return [Generation(out[i], stream.texts[i].strip(), finish[i] or "length", lengths[i]) for i in range(b)]
        finally:
            ctx.key_value_memory_dict.clear()
            self.model.train(was_training)



class TextStream:
    """Token ids -> text per sample: stop strings, and streaming of the new text.

    Text is passed on only after a token that is not a byte-fallback piece (`<0x..>`): bytes of a
    character still being spelled decode differently once it is complete."""

    def __init__(self, tokenizer, batch: int, stops: list[str], on_text: Callable[[int, str], None] | None = None):
        self.tok, self.stops, self.on_text = tokenizer, [s for s in stops if s], on_text
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.texts = [""] * batch
        self.sent = [""] * batch
        self._byte: dict[int, bool] = {}

    def _is_byte(self, t: int) -> bool:
        if t not in self._byte:
            piece = self.tok.convert_ids_to_tokens(t)
            self._byte[t] = isinstance(piece, str) and piece.startswith("<0x") and piece.endswith(">")
        return self._byte[t]

    def push(self, i: int, t: int) -> bool:
        """Add token `t` to sample i; True when a stop string has appeared (the text ends before it)."""
        self.ids[i].append(t)
        text = self.tok.decode(self.ids[i], skip_special_tokens=True)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            text = text[: min(hits)]
        self.texts[i] = text
        if hits or not self._is_byte(t):
            self._emit(i)
        return bool(hits)

    def _emit(self, i: int) -> None:
        text, sent = self.texts[i], self.sent[i]
        if self.on_text is not None and text.startswith(sent) and len(text) > len(sent):
            self.on_text(i, text[len(sent):])
            self.sent[i] = text

    def flush(self) -> None:
        for i in range(len(self.ids)):
            self._emit(i)
