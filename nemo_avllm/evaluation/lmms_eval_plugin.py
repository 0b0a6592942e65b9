"""The AVLLM as an lmms-eval model: `lmms-eval --model avllm --model_args pretrained=EXPORT_DIR ...`.

lmms-eval (the harness most video-LLM users run) finds external models through the Python
entry-point group `lmms_eval.models`; pyproject.toml declares `avllm = nemo_avllm.evaluation.
lmms_eval_plugin:manifest`, so installing nemo_avllm (with the `lmms-eval` extra) is all it takes.

`AVLLM` answers lmms-eval's requests with the `avllm export-hf` folder through the same code as
`avllm generate hf=...` (`inference.backends.HFBackend`):
- `generate_until`: each request's visual (a video, image or audio file path, a PIL image, or an
  audio dict `{array, sampling_rate}`) is asked about with the modality token its file calls for
  (`modality=auto`, or forced, e.g. `modality=<VIS>` for the visual-only run of Fig. 5);
  `gen_kwargs` give `until`, `max_new_tokens`, `temperature`, `top_p`, `do_sample`.
- `loglikelihood`: the log-probability of the continuation as the assistant's answer.
Model args: `pretrained` (required), `dtype` (bf16|fp16|fp32), `modality`, `max_new_tokens`
(default when a task gives none); `--batch_size` and `--device` come from lmms-eval's own flags.
One process on one device (a 7B or 13B export in bf16 fits one 80 GB GPU).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_ID = "avllm"


def manifest():
    """The entry point's payload: lmms-eval imports the class only when `--model avllm` is asked."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.AVLLM")


class AVLLM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, dtype: str | None = None, device: str | None = None, batch_size: int | str = 1,
                 modality: str = "auto", max_new_tokens: int | str = 128, max_batch_size: int | None = None, **kwargs):
        """`batch_size`: questions per forward pass (lmms-eval's `--batch_size`; "auto" = 1, and
        `max_batch_size`, which only bounds "auto", is not used)."""
        super().__init__()
        from nemo_avllm.inference.backends import HFBackend
        from nemo_avllm.inference.tasks import MODALITY_CHOICES

        if kwargs:
            raise ValueError(f"--model_args for avllm: unknown {sorted(kwargs)}; known: pretrained, dtype, device, "
                             f"batch_size, modality, max_new_tokens")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError("avllm in lmms-eval runs in one process (lmms-eval's multi-process sharding is "
                                      "not wired); launch `lmms-eval` without accelerate/torchrun")
        if modality not in MODALITY_CHOICES:
            raise ValueError(f"--model_args modality={modality!r}; expected one of {MODALITY_CHOICES}")
        if not (Path(pretrained) / "config.json").is_file():
            raise FileNotFoundError(f"--model_args pretrained={pretrained} is not an `avllm export-hf` folder "
                                    f"(no config.json); export a checkpoint with `avllm export-hf checkpoint=... out=DIR`")
        self.backend = HFBackend(pretrained, dtype, device)
        self.batch_size_per_gpu = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.modality = modality
        self.max_new_tokens = int(max_new_tokens)
        self._tmp = tempfile.TemporaryDirectory(prefix="avllm-lmms-")

    # --- what a request holds ---------------------------------------------------------------------
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _media_file(self, visual, key: str) -> str:
        """A file path for one lmms-eval visual (paths pass through; images and audio arrays are
        written once to a temporary file, which the media decoder reads like any user file)."""
        if isinstance(visual, (str, Path)):
            return str(visual)
        if isinstance(visual, dict) and "array" in visual and "sampling_rate" in visual:
            import soundfile

            path = Path(self._tmp.name) / f"{key}.wav"
            soundfile.write(path, visual["array"], int(visual["sampling_rate"]))
            return str(path)
        if hasattr(visual, "save"):  # PIL image
            path = Path(self._tmp.name) / f"{key}.png"
            visual.convert("RGB").save(path)
            return str(path)
        raise TypeError(f"avllm: cannot read a visual of type {type(visual).__name__}; it takes a video, image or "
                        f"audio file path, a PIL image, or an audio dict with 'array' and 'sampling_rate'")

    def _question(self, req: Instance, contexts: str, doc_to_visual, doc_id, task, split):
        from nemo_avllm.inference.tasks import Question, choose_modality, question_turn

        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(f"avllm answers about one video, image or audio per question; request {req.idx} of task "
                             f"{task} gives {len(visuals)} visuals")
        path = self._media_file(visuals[0], f"{task}-{split}-{doc_id}")
        token = choose_modality(path, self.modality)
        return Question(str(doc_id), path, None, [question_turn(contexts, token)], token)

    def _sampling(self, gen_kwargs: dict):
        from nemo_avllm.inference.engine import SamplingConfig

        g = dict(gen_kwargs or {})
        until = g.get("until") or []
        temperature = float(g.get("temperature") or 0.0) if g.get("do_sample", True) else 0.0
        return SamplingConfig(max_new_tokens=int(g.get("max_new_tokens") or self.max_new_tokens), temperature=temperature,
                              top_p=float(g.get("top_p") or 0.0) if temperature > 0 else 0.0,
                              stop=[until] if isinstance(until, str) else list(until))

    # --- lmms-eval's interface ----------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from nemo_avllm.inference.tasks import answer_batch

        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # batch requests that share their generation settings
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        for idx in groups.values():
            sampling = self._sampling(requests[idx[0]].args[1])
            for s in range(0, len(idx), self.batch_size_per_gpu):
                chunk = idx[s: s + self.batch_size_per_gpu]
                qs = [self._question(requests[i], c, v, d, t, sp)
                      for i in chunk for c, _, v, d, t, sp in [requests[i].args]]
                for i, g in zip(chunk, answer_batch(self.backend, qs, sampling)):
                    out[i] = g.text
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from nemo_avllm.inference.tasks import load_inputs

        out = []
        for req in requests:
            contexts, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            q = self._question(req, contexts, doc_to_visual, doc_id, task, split)
            b = self.backend
            prompt = b.prompt(q.turns)
            cont = b.tokenizer.encode(continuation.strip(), add_special_tokens=False)  # as training tokenises answers
            video, audio = load_inputs(b, q.video, q.audio, q.turns)
            out.append(b.loglikelihood([prompt], [cont], b.features([prompt], video, audio))[0])
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("avllm: multi-round generation is not supported; use `avllm chat` for conversations")
