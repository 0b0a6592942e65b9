"""The two places a trained model can answer from, behind one small interface.

- `MegatronBackend`: a training (dist) checkpoint, loaded at PP=1 and any TP (checkpoints
  reshard), generating with `nemo_avllm.inference.engine` (megatron-core's inference wrapper and
  static KV cache).
- `HFBackend`: an `avllm export-hf` folder, generating with transformers' `generate` on the
  `LlamaForCausalLM` (its DynamicCache is the KV cache) from the spliced input embeddings.

Both take prompts in the training template (`nemo_avllm.data.conversation`), encode the media of
a batch once (`features`, reused over the turns of a chat) and return `engine.Generation`s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from nemo_avllm.data.conversation import tokenize_conversation
from nemo_avllm.data.decode import DecodeSettings
from nemo_avllm.inference.engine import Generation, MegatronGenerator, SamplingConfig, TextStream

log = logging.getLogger(__name__)


class MegatronBackend:
    name = "megatron"

    def __init__(self, checkpoint: str | Path, tokenizer: str | None = None, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1, model_overrides: dict | None = None):

        from nemo_avllm.data.tokenizer import load_tokenizer
        from nemo_avllm.model.provider import build_model
        from nemo_avllm.runtime import distributed
        from nemo_avllm.training import checkpoint as dist_ckpt

        if int(pipeline_model_parallel_size) != 1:
            raise NotImplementedError(
                f"pipeline_model_parallel_size={pipeline_model_parallel_size}: generation runs on one pipeline stage. "
                f"Use pipeline_model_parallel_size=1 (the dist checkpoint reshards to PP=1 on load; TP splits a "
                f"model too big for one device), or export it (`avllm export-hf checkpoint=... out=DIR`) and "
                f"generate with hf=DIR"
            )
        ckpt = Path(checkpoint)
        cfg = dist_ckpt.model_config(ckpt)
        cfg.merge_with(model_overrides or {})
        cfg.tensor_model_parallel_size = int(tensor_model_parallel_size)
        cfg.pipeline_model_parallel_size = 1
        cfg.sequence_parallel = False
        cfg.build_encoders = True
        distributed.initialize(int(tensor_model_parallel_size), 1)
        self.model = build_model(cfg)
        missing = dist_ckpt.missing_tensors(ckpt, self.model)
        if any(not k.startswith(("vision.", "audio.")) for k in missing):
            raise ValueError(f"{ckpt} lacks model tensors {[k for k in missing if not k.startswith(('vision.', 'audio.'))][:3]}: "
                             f"not a trained AVLLM checkpoint (an import-hf checkpoint holds the LLM only)")
        for kind in ("vision", "audio"):
            if any(k.startswith(kind + ".") for k in missing) and not cfg[kind].get("checkpoint") \
                    and not cfg.get("allow_random_init", False):
                raise ValueError(
                    f"{ckpt} has no {kind} encoder weights (trained on cached features) and model.{kind}.checkpoint "
                    f"is null: give model.{kind}.checkpoint=<the encoder weights the features were made with>, or "
                    f"model.allow_random_init=true for a model whose encoders were random (tests, the demo)")
        dist_ckpt.load(ckpt, self.model, allow_missing=("vision.", "audio."))  # checked above
        self.model.to(distributed.device()).eval()  # the frozen encoders are built on the CPU
        self.cfg = cfg
        self.tokenizer = load_tokenizer(tokenizer or cfg.get("tokenizer") or _missing_tokenizer(ckpt))
        self.layout = self.model.layout
        from nemo_avllm.training.data import decode_settings

        self.decode = decode_settings(self.model.cfg)  # the typed config the model was built from
        self.generator = MegatronGenerator(self.model, self.tokenizer)
        self.source = str(ckpt)

    def prompt(self, turns: list[dict]) -> list[int]:
        return tokenize_conversation(turns, self.tokenizer, self.layout, add_generation_prompt=True).input_ids

    def features(self, prompts: list[list[int]], video=None, audio=None):
        return self.generator.encode(prompts, video, audio)

    def generate(self, prompts, features, sampling: SamplingConfig, on_text: Callable | None = None) -> list[Generation]:
        return self.generator.generate(prompts, sampling, features=features, on_text=on_text)


def _missing_tokenizer(ckpt):
    raise ValueError(f"{ckpt}: the checkpoint's model.tokenizer is null; give tokenizer=<HF tokenizer folder>")


class _Streamer:
    """transformers streamer -> `TextStream` (the same stop and streaming rules as megatron's loop)."""

    def __init__(self, stream: TextStream, eos_id: int):
        self.stream, self.eos_id = stream, eos_id
        self.done = [False] * len(stream.ids)

    def put(self, value: torch.Tensor):
        for i, row in enumerate(value.reshape(len(self.done), -1).tolist()):
            for t in row:
                if not self.done[i]:
                    self.done[i] = t == self.eos_id or self.stream.push(i, t)

    def end(self):
        self.stream.flush()


class HFBackend:
    """An export folder; transformers `generate` on the LLM with the spliced embeddings."""

    name = "hf"

    def __init__(self, folder: str | Path, dtype: str | None = None, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nemo_avllm.hf import hf_model  # importing nemo_avllm.hf registers the Auto classes

        kwargs = {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]} if dtype else {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        hf_model.check_tokenizer(self.tokenizer, self.model.config)
        c = self.model.config
        self.layout = c.layout()
        self.decode = DecodeSettings(c.num_frames, c.num_audio_segments, c.vision_config.image_size, c.sample_rate,
                                     c.clip_samples)
        self.source = str(folder)
        self._hf = hf_model

    def prompt(self, turns: list[dict]) -> list[int]:
        return self._hf.encode_conversation(self.tokenizer, turns, self.model.config)

    def _ids(self, prompts):
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def features(self, prompts, video=None, audio=None):
        ids, _ = self._ids(prompts)
        video, audio = (x.to(self.device) if x is not None else None for x in (video, audio))
        return self.model.media_features(self._hf.placeholder_ids(ids, self.model.config), video, audio)

    @torch.no_grad()
    def generate(self, prompts, features, sampling: SamplingConfig, on_text: Callable | None = None) -> list[Generation]:
        ids, mask = self._ids(prompts)
        # feature rows are per sample: a chat turn's longer prompt reuses the first turn's rows
        embeds = self.model.embed(ids, features=features)
        c = self.model.config
        kw = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                  pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
                  eos_token_id=self.tokenizer.eos_token_id)
        if not sampling.greedy:
            kw.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p or None)
            torch.manual_seed(int(sampling.seed))
        in_vocab = [i for i in c.modality_token_ids.values() if i < c.text_config.vocab_size]
        if in_vocab:
            kw["suppress_tokens"] = in_vocab
        if sampling.stop:
            kw.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if on_text is not None:
            kw["streamer"] = _Streamer(TextStream(self.tokenizer, len(prompts), sampling.stop, on_text),
                                       self.tokenizer.eos_token_id)
        out = self.model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
        stream, results = TextStream(self.tokenizer, len(prompts), sampling.stop), []
        for i, row in enumerate(out.tolist()):
            ids, finish = [], "length"
            for t in row:
                if t == self.tokenizer.eos_token_id:
                    finish = "eos"
                    break
                ids.append(t)
                if stream.push(i, t):
                    finish = "stop"
                    break
            results.append(Generation(ids, stream.texts[i].strip(), finish, len(prompts[i])))
        return results


    @torch.no_grad()
    def loglikelihood(self, prompts: list[list[int]], continuations: list[list[int]], features) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each continuation after its prompt, whether greedy decoding
        would have produced it): what likelihood-scored benchmarks (lmms-eval's `loglikelihood`) ask."""
        full = [p + c for p, c in zip(prompts, continuations)]
        ids, mask = self._ids(full)
        logits = self.model.language_model(inputs_embeds=self.model.embed(ids, features=features),
                                           attention_mask=mask).logits.float()
        out = []
        width = ids.shape[1]
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            if not c:
                out.append((0.0, True))
                continue
            start = width - len(c)  # left padding: the continuation ends the row
            rows = torch.log_softmax(logits[i, start - 1: width - 1], dim=-1)  # position t predicts token t+1
            target = torch.tensor(c, device=rows.device)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
        return out


def load_backend(cfg) -> MegatronBackend | HFBackend:
    """`checkpoint=` (dist checkpoint) or `hf=` (export folder) from conf/generate.yaml."""
    if bool(cfg.get("checkpoint")) == bool(cfg.get("hf")):
        raise ValueError("give exactly one of checkpoint=<dist checkpoint folder> or hf=<export-hf folder>")
    if cfg.get("hf"):
        return HFBackend(cfg.hf, cfg.get("dtype"), cfg.get("device"))
    return MegatronBackend(cfg.checkpoint, cfg.get("tokenizer"), int(cfg.get("tensor_model_parallel_size", 1)),
                           int(cfg.get("pipeline_model_parallel_size", 1)), cfg.get("model_overrides") or {})
