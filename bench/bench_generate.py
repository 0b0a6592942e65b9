"""Generation throughput of the tiny AVLLM on CPU: first-token latency and decode tokens/s.

megatron-core KV-cache engine (`nemo_avllm.inference.engine`) vs the no-cache reference loop
(`greedy_generate`), batch 1 and 4, encoders included in the first-token time. Prints one JSON
line per measurement. Usage: PYTHONPATH=. OMP_NUM_THREADS=2 python bench/bench_generate.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(new_tokens: int = 32, repeats: int = 3) -> None:
    from nemo_avllm import config
    from nemo_avllm.data.tokenizer import load_tokenizer, train_sentencepiece
    from nemo_avllm.inference.engine import MegatronGenerator, SamplingConfig
    from nemo_avllm.inference.generate import greedy_generate, prompt_ids
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from tests.conftest import TOKENIZER_TEXTS
    from tests.hf.worker import scale_

    distributed.initialize(1, 1, seed=0)
    tok = load_tokenizer(train_sentencepiece(TOKENIZER_TEXTS, tempfile.mkdtemp(), vocab_size=512))
    cfg = config.load_model("tiny_demo")
    model = build_model(cfg).eval()
    scale_(model)  # long answers: no early EOS
    gen = MegatronGenerator(model, tok)
    lay = model.layout
    for batch in (1, 4):
        turns = [{"from": "human", "value": "<AUD_VIS> What colour is the square and what does it sound like?"}]
        prompts = [prompt_ids(turns, tok, lay)] * batch
        size = model.cfg.vision.geometry()["image_size"]
        video = torch.randn(batch, lay.num_frames, 3, size, size)
        audio = torch.randn(batch, lay.num_audio_segments, model.cfg.audio.clip_samples)
        for name in ("megatron_kv_cache", "no_cache_loop"):
            firsts, totals = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                if name == "megatron_kv_cache":
                    first = []
                    feats = gen.encode(prompts, video, audio)
                    out = gen.generate(prompts, SamplingConfig(max_new_tokens=new_tokens), features=feats,
                                       on_text=lambda i, p: first.append(time.perf_counter()) if not first else None)
                    n = sum(len(o.tokens) for o in out)
                    firsts.append((first[0] if first else time.perf_counter()) - t0)
                else:
                    t1 = time.perf_counter()
                    greedy_generate(model, prompts, video=video, audio=audio, eos_id=tok.eos_token_id, max_new_tokens=1)
                    firsts.append(time.perf_counter() - t1)
                    t0 = time.perf_counter()
                    out = greedy_generate(model, prompts, video=video, audio=audio, eos_id=tok.eos_token_id,
                                          max_new_tokens=new_tokens)
                    n = sum(len(o) for o in out)
                totals.append((time.perf_counter() - t0, n))
            best = min(totals)
            print(json.dumps({"bench": "generate", "path": name, "model": "tiny_demo", "batch": batch,
                              "prompt_tokens": len(prompts[0]), "new_tokens": best[1],
                              "first_token_s": round(min(firsts), 4), "total_s": round(best[0], 4),
                              "tokens_per_s": round(best[1] / best[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
