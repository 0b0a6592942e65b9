"""Memory per GPU of a training configuration, before a job starts (`nemo_avllm.training.memory_plan`
holds the formulas and how parameters are counted).

    python bench/memory_plan.py --config stage2_finetune --tp 2 --dp 4 [--pp 1] [--micro-batch 4]
        [--seq-length 2048] [--recompute on|off] [--no-encoders] [--no-flash-attention] [--gpu-gib 40]
    python bench/memory_plan.py --table        # the table in docs/training.md: stages 1/2 x TP1/DP8, TP2/DP4

Defaults come from conf/<config>.yaml. Prints one machine-readable line per component (GiB per
GPU, most loaded pipeline stage), then the total; with --gpu-gib also whether it fits, and exits
with status 1 when it does not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # laion_clap's import must not wait for a hub

CONFIGS = ("stage1_pretrain", "stage2_finetune")
TABLE_LAYOUTS = ((1, 8), (2, 4))  # (TP, DP) on 8 GPUs
TABLE_GPUS = (("A100-40GB", 40), ("A100-80GB", 80))


def load_cfg(config_name: str, model: str, tp: int, pp: int):
    from nemo_avllm import config

    return config.load(config_name, [f"model={model}", f"model.tensor_model_parallel_size={tp}",
                                     f"model.pipeline_model_parallel_size={pp}"])


def plan_of(cfg, dp: int, **changes):
    """The plan of a loaded config; `changes` of None keep the config's value."""
    from nemo_avllm.training import memory_plan

    changes = {k: v for k, v in changes.items() if v is not None}
    return memory_plan.plan(cfg.model, memory_plan.layout_of(cfg, dp, **changes))


def gib(x: float) -> str:
    from nemo_avllm.training.memory_plan import GIB

    return f"{x / GIB:.2f}"


def print_lines(args, p) -> int:
    from nemo_avllm.training.memory_plan import GIB

    lay = p.layout
    head = (f"memory config={args.config} model={args.model} tp={lay.tp} pp={lay.pp} dp={lay.dp} "
            f"micro_batch={lay.micro_batch} seq_length={lay.seq_length} recompute={'on' if lay.recompute else 'off'} "
            f"encoders={'on' if lay.encoders else 'off'} flash_attention={'on' if lay.flash_attention else 'off'} "
            f"stage={p.stage}")
    for name, value in p.components().items():
        print(f"{head} component={name} gib={value / GIB:.2f}")
    if args.gpu_gib is None:
        return 0
    fits = p.total <= args.gpu_gib * GIB
    print(f"{head} gpu_gib={args.gpu_gib:g} fits={'yes' if fits else 'no'} headroom_gib={args.gpu_gib - p.total / GIB:.2f}")
    return 0 if fits else 1


def fit(plans, gpu_gib: float) -> str:
    """Which recompute setting fits: `both`, `recompute only` or `no`."""
    from nemo_avllm.training.memory_plan import GIB

    off, on = (p.total <= gpu_gib * GIB for p in plans)
    return "both" if off else "recompute only" if on else "no"


def table(model: str) -> str:
    """Markdown: per stage and layout, the components and both totals; the fit per GPU."""
    rows = ["| stage (configured recompute) | TP x PP x DP | micro-batch x seq | weights | encoders | gradients | "
            "optimizer | activations: no recompute / recompute | total: no recompute / recompute | "
            + " | ".join(f"{name} ({g} GiB)" for name, g in TABLE_GPUS) + " |",
            "|" + "---|" * (9 + len(TABLE_GPUS))]
    for config_name in CONFIGS:
        for tp, dp in TABLE_LAYOUTS:
            cfg = load_cfg(config_name, model, tp, 1)
            off, on = (plan_of(cfg, dp, recompute=r) for r in (False, True))
            lay, configured = off.layout, bool(cfg.model.get("activations_checkpoint", False))
            rows.append(
                f"| {config_name} ({'on' if configured else 'off'}) | {tp} x 1 x {dp} | {lay.micro_batch} x {lay.seq_length} "
                f"| {gib(off.weights)} | {gib(off.encoders)} | {gib(off.gradients)} | {gib(off.optimizer)} "
                f"| {gib(off.activations)} / {gib(on.activations)} | {gib(off.total)} / {gib(on.total)} | "
                + " | ".join(fit((off, on), g) for _, g in TABLE_GPUS) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=CONFIGS, default="stage2_finetune")
    ap.add_argument("--model", choices=("vicuna7b", "vicuna13b"), default="vicuna7b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, help="default: the config's model.micro_batch_size")
    ap.add_argument("--seq-length", type=int, help="default: the config's model.seq_length")
    ap.add_argument("--recompute", choices=("on", "off"), help="default: the config's model.activations_checkpoint")
    ap.add_argument("--encoders", action=argparse.BooleanOptionalAction, default=None,
                    help="frozen encoders on the GPU (default: built unless a feature cache is configured)")
    ap.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=True,
                    help="fused/flash attention (Transformer Engine on GPU nodes); off adds the a*s^2 softmax term")
    ap.add_argument("--gpu-gib", type=float, help="GPU memory in GiB: also print whether the plan fits")
    ap.add_argument("--table", action="store_true", help="print the markdown table of docs/training.md and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.model))
        return 0
    p = plan_of(load_cfg(args.config, args.model, args.tp, args.pp), args.dp, micro_batch=args.micro_batch,
                seq_length=args.seq_length, recompute=None if args.recompute is None else args.recompute == "on",
                encoders=args.encoders, flash_attention=args.flash_attention)
    return print_lines(args, p)


if __name__ == "__main__":
    sys.exit(main())
