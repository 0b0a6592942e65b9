"""Checkpoint interop cost: import-hf and export-hf time and peak memory.

    python bench/bench_export.py [--wide-layers 2] [--workdir DIR]

Each measured step runs in a fresh process (peak RSS = its VmHWM; `base_rss_mb` is its peak after
imports, before any weights). Steps:

  tiny                  import of a tiny HF LLaMA; export of the tiny AVLLM (LLM + encoders + projectors)
  vicuna7b-Nlayers      the 7B *width* (vocab 32000, hidden 4096, ffn 11008, bf16) with N layers:
                        import, and export of the LLM (llm_only), measured
  vicuna7b              by arithmetic (shapes only): weights bytes, largest tensor, and the
                        predicted peak = base + weights + transient, the rule first checked
                        against the measured wide run (`check=rule` lines); time scaled by bytes;
                        `vicuna7b-avllm` adds ViT-L/14, HTSAT-base and the projectors

Why the peak is one model, not two: import allocates the model once, empty, in bf16, fills it
tensor by tensor from the safetensors shards (no file stays mapped; the transient is one layer's
gate/up pair and their concatenation) and saves it in place (SwiGLU fc1 as whole tensors: megatron's
gate/up checkpoint factory would copy every layer's fc1, +45%); export loads the checkpoint in
place into one empty model (transient: dist checkpointing's read buffers, about two of the largest
tensors) and writes each safetensors file tensor by tensor (`write_safetensors`).

Prints machine-readable lines, e.g.
    import model=tiny seconds=1.9 peak_rss_mb=1234 base_rss_mb=1200
    import model=vicuna7b estimate=arithmetic weights_mb=12852 predicted_peak_mb=... seconds_est=...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2**20


def _rss_mb() -> float:
    """Peak RSS of this process image. Linux's ru_maxrss survives exec, so a child started by a
    big parent would report the parent's size; VmHWM belongs to the new image only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- one measured step (child process) -----------------------------------------------------------
def step(args) -> dict:
    import torch  # noqa: F401

    from nemo_avllm import config
    from nemo_avllm.hf import hf_model  # noqa: F401  (before megatron's CPU shims)
    from nemo_avllm.hf.export_hf import export_hf
    from nemo_avllm.hf.import_hf import import_hf

    base = _rss_mb()
    t = time.perf_counter()
    if args.step == "import":
        import_hf(args.src, args.dst, config.load_model(args.model, args.override), overwrite=True)
    else:
        export_hf(args.src, args.dst, tokenizer=args.tokenizer, llm_only=args.llm_only, overwrite=True)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def measure(kind: str, label: str, src: Path, dst: Path, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--step", kind, "--src", str(src), "--dst", str(dst), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{kind} model={label} seconds={r['seconds']:.2f} peak_rss_mb={r['peak_rss_mb']:.0f} base_rss_mb={r['base_rss_mb']:.0f}", flush=True)
    return r


# ---- setup (parent) ------------------------------------------------------------------------------
def hf_llama(folder: Path, overrides: list[str], dtype) -> None:
    """A random LLaMA folder for a model config, built without a second copy (meta, then fill)."""
    import torch
    from transformers import LlamaForCausalLM

    from nemo_avllm import config
    from nemo_avllm.config import to_dict
    from nemo_avllm.hf import llama_bridge
    from nemo_avllm.model.llm import LLMConfig

    name, *rest = overrides
    llm = LLMConfig.from_dict(to_dict(config.load_model(name, rest).llm))
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_bridge.hf_llama_config(llm, dtype))
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)


def tiny_avllm_checkpoint(folder: Path, tokenizer: Path) -> None:
    import torch

    from nemo_avllm import config
    from nemo_avllm.config import to_dict
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training import checkpoint

    distributed.initialize(1, 1)
    cfg = config.load_model("tiny")
    torch.manual_seed(0)
    common = to_dict(cfg)
    common["tokenizer"] = str(tokenizer)
    checkpoint.save(folder, build_model(cfg), common={"cfg": common})
    distributed.destroy()


def _sizes(llm) -> dict:
    """bf16 bytes of an LLM and of what import/export hold besides it (the rule the wide run checks)."""
    b = 2
    h, f, v = llm.hidden_size, llm.ffn_hidden_size, llm.padded_vocab_size
    kv = llm.kv_groups * h // llm.num_attention_heads
    qkv, fc1, emb = (h * h + 2 * kv * h) * b, 2 * f * h * b, v * h * b
    return {
        "weights": llm.num_parameters() * b,
        "largest": max(emb, fc1 // 2),
        # import: the HF parts of a fused tensor (q, k, v or gate, up) and their concatenation
        "import_transient": max(2 * qkv, 2 * fc1, emb),
        # export: dist checkpointing reads each tensor into a buffer before copying it in place,
        # two at a time (its reader threads): about the two largest tensors
        "export_transient": 2 * max(emb, fc1),
    }


def _encoders_bytes(model_name: str) -> int:
    """bf16 bytes of the frozen encoders and projectors of a model config (vision tower counted on
    the meta device; HTSAT is small and built for real, its front end refuses meta tensors)."""
    import torch

    from nemo_avllm import config
    from nemo_avllm.model.encoders import AudioEncoder, VisionEncoder
    from nemo_avllm.model.provider import avllm_config

    section = avllm_config(config.load_model(model_name))
    section.vision.checkpoint = section.audio.checkpoint = None
    with torch.device("meta"):
        vision = sum(p.numel() for p in VisionEncoder(section.vision).parameters())
    audio = sum(p.numel() for p in AudioEncoder(section.audio).parameters())
    h, vw, aw = section.llm.hidden_size, section.vision.geometry()["width"], section.audio.width
    projectors = 2 * (vw * h + h) + aw * h + h
    return 2 * (vision + audio + projectors)


def arithmetic(base: dict, wide: dict, wide_layers: int) -> None:
    """7B numbers by arithmetic, after checking the rule against the measured wide run."""
    from nemo_avllm import config
    from nemo_avllm.config import to_dict
    from nemo_avllm.model.llm import LLMConfig

    def llm(overrides):
        return LLMConfig.from_dict(to_dict(config.load_model("vicuna7b", overrides).llm))

    w, s = _sizes(llm([f"llm.num_layers={wide_layers}"])), _sizes(llm([]))
    encoders = _encoders_bytes("vicuna7b")
    for kind in ("import", "export"):
        measured = wide[kind]
        pred_wide = base[kind] + (w["weights"] + w[f"{kind}_transient"]) / MB
        print(f"{kind} model=vicuna7b-{wide_layers}layers check=rule predicted_peak_mb={pred_wide:.0f} "
              f"measured_peak_mb={measured['peak_rss_mb']:.0f} model_mb={w['weights'] / MB:.0f}", flush=True)
        rate = w["weights"] / measured["seconds"]  # bytes/s of the measured run
        pred = base[kind] + (s["weights"] + s[f"{kind}_transient"]) / MB
        print(f"{kind} model=vicuna7b estimate=arithmetic weights_mb={s['weights'] / MB:.0f} largest_tensor_mb={s['largest'] / MB:.0f} "
              f"transient_mb={s[f'{kind}_transient'] / MB:.0f} predicted_peak_mb={pred:.0f} seconds_est={s['weights'] / rate:.0f}", flush=True)
    full = base["export"] + (s["weights"] + encoders + s["export_transient"]) / MB
    print(f"export model=vicuna7b-avllm estimate=arithmetic encoders_projectors_mb={encoders / MB:.0f} predicted_peak_mb={full:.0f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wide-layers", type=int, default=2, help="layers of the measured 7B-width model")
    ap.add_argument("--workdir", default=None)
    # child-process step (internal)
    ap.add_argument("--step", choices=["import", "export"])
    ap.add_argument("--src")
    ap.add_argument("--dst")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--override", action="append", default=[])
    ap.add_argument("--tokenizer")
    ap.add_argument("--llm-only", action="store_true")
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return 0

    import torch

    from nemo_avllm.data.tokenizer import train_sentencepiece
    from tests.conftest import TOKENIZER_TEXTS

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    tok = train_sentencepiece(TOKENIZER_TEXTS, work / "tokenizer", vocab_size=512)
    # tiny
    hf_llama(work / "hf_tiny", ["tiny"], torch.float32)
    tiny_avllm_checkpoint(work / "ckpt_tiny_av", tok)
    measure("import", "tiny", work / "hf_tiny", work / "ckpt_tiny", ["--model", "tiny"])
    measure("export", "tiny", work / "ckpt_tiny_av", work / "out_tiny", [])
    # the 7B width, a few layers, bf16
    n = args.wide_layers
    hf_llama(work / "hf_wide", ["vicuna7b", f"llm.num_layers={n}"], torch.bfloat16)
    wide = {
        "import": measure("import", f"vicuna7b-{n}layers", work / "hf_wide", work / "ckpt_wide",
                          ["--model", "vicuna7b", "--override", f"llm.num_layers={n}"]),
        "export": measure("export", f"vicuna7b-{n}layers", work / "ckpt_wide", work / "out_wide",
                          ["--tokenizer", str(tok), "--llm-only"]),
    }
    arithmetic({k: wide[k]["base_rss_mb"] for k in wide}, wide, n)
    print(f"# files in {work}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
