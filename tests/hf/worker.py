"""Helpers of the interop tests, and the torchrun worker they launch for TP/PP runs.

As a script (torchrun, gloo):
  `--mode save`   builds the tiny AVLLM at TP x PP, loads a full (TP=1/PP=1) state dict into its
                  shards (`parallel_layout.load_full_state_dict`) and saves a dist checkpoint with
                  `nemo_avllm.training.checkpoint.save`, as training would;
  `--mode logits` loads a dist checkpoint (an import-hf one lacks projectors and encoders) into the tiny
                  AVLLM at TP x PP and writes the logits of given token ids through megatron's
                  pipeline schedule (last stage, TP rank 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ---- tiny models ---------------------------------------------------------------------------------
def tiny_cfg(overrides=()):
    from nemo_avllm import config

    return config.load_model("tiny", list(overrides))


def scale_(model, prefixes=("llm.", "proj_", "model.", "lm_head.")) -> None:
    """Weights far from init scale (std 0.15, norms around 1), so logits are not flat and a wrong
    mapping cannot hide in rounding."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(prefixes):
                continue
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_hf_llama(folder: Path, overrides=(), **save_kwargs):
    """A random `LlamaForCausalLM` with the tiny LLM's architecture, saved to `folder`."""
    from transformers import LlamaForCausalLM

    from nemo_avllm.config import to_dict
    from nemo_avllm.hf import llama_bridge
    from nemo_avllm.model.llm import LLMConfig

    llm = LLMConfig.from_dict(to_dict(tiny_cfg(overrides).llm))
    model = LlamaForCausalLM(llama_bridge.hf_llama_config(llm, torch.float32)).eval()
    scale_(model)
    model.save_pretrained(folder, **save_kwargs)
    return model


def av_batch(layout, vocab: int, seed: int = 3, image_size: int = 64, audio_samples: int = 480000) -> dict:
    """Two samples: one with all three modality tokens (<AUD_VIS>, <VIS>, <AUD> in one
    conversation), one with <VIS> only (its audio is never encoded: selective activation)."""
    from nemo_avllm import modality

    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    rows = [
        [1] + text(4) + layout.expansion(modality.AUD_VIS_TOKEN) + text(3) + layout.expansion(modality.VIS_TOKEN)
        + text(2) + layout.expansion(modality.AUD_TOKEN) + text(5),
        [1] + text(6) + layout.expansion(modality.VIS_TOKEN) + text(7),
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [2] * (width - len(r)) for r in rows])
    video = torch.randn(2, layout.num_frames, 3, image_size, image_size, generator=g)
    audio = 0.1 * torch.randn(2, layout.num_audio_segments, audio_samples, generator=g)
    return {"input_ids": ids, "video": video, "audio": audio}


# ---- worker --------------------------------------------------------------------------------------
def _save(args, cfg, model) -> None:
    from nemo_avllm.config import to_dict
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.training import checkpoint

    parallel_layout.load_full_state_dict(model, torch.load(args.weights, weights_only=True))
    common = to_dict(cfg)
    common["tokenizer"] = args.tokenizer
    checkpoint.save(args.ckpt, model, common={"cfg": common})


def _logits(args, model) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm.training import checkpoint

    checkpoint.load(args.ckpt, model, allow_missing=checkpoint.NOT_IN_LLM_CHECKPOINT)
    model.eval()
    ids = torch.load(args.ids, weights_only=True)

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(input_ids=batch, runtime_gather_output=True)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach().clone()})

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([ids]), model=model, num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
        )
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(out[0]["logits"], args.out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["save", "logits"], required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--weights")
    p.add_argument("--tokenizer")
    p.add_argument("--ids")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)

    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed

    distributed.initialize(args.tp, args.pp)
    cfg = tiny_cfg([f"tensor_model_parallel_size={args.tp}", f"pipeline_model_parallel_size={args.pp}"])
    model = build_model(cfg)
    _save(args, cfg, model) if args.mode == "save" else _logits(args, model)
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
