"""Worker for the TP/PP parity tests; run with torchrun (or plain python for the reference).

`--mode reference` (1 process, TP=1, PP=1): builds the tiny AVLLM, saves its full state dict,
then runs megatron's forward-backward over M micro-batches and saves losses, logits and grads.
`--mode compare` (TP x PP processes): loads that state dict into its shard, runs the same
micro-batches through megatron's pipeline schedule, and compares its shard of every quantity
with the reference. Rank 0 writes a JSON report of the largest differences."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def make_batches(layout, vocab: int, num_microbatches: int, micro_batch_size: int, seq_len: int, image_size: int, seed: int):
    """Deterministic micro-batches mixing <VIS>, <AUD>, <AUD_VIS> samples (and several tokens per sample)."""
    from nemo_avllm import modality
    from nemo_avllm.data.collate import collate_tokens
    from nemo_avllm.data.conversation import TokenizedSample

    g = torch.Generator().manual_seed(seed)
    kinds = [["<VIS>"], ["<AUD>"], ["<AUD_VIS>"], ["<VIS>", "<AUD>"]]
    batches, n = [], 0
    for _ in range(num_microbatches):
        samples = []
        for _ in range(micro_batch_size):
            seq, lab = [1], [modality.IGNORE_INDEX]
            for tok in kinds[n % len(kinds)]:
                q = torch.randint(3, vocab, (3,), generator=g).tolist()
                a = torch.randint(3, vocab, (4,), generator=g).tolist()
                exp = layout.expansion(tok)
                seq += q + exp + a + [2]
                lab += [modality.IGNORE_INDEX] * (len(q) + len(exp)) + a + [2]
            n += 1
            samples.append(TokenizedSample(seq, lab))
        batch = collate_tokens(samples, seq_length=seq_len)
        batch["video"] = torch.randn(micro_batch_size, layout.num_frames, 3, image_size, image_size, generator=g)
        batch["audio"] = 0.1 * torch.randn(micro_batch_size, layout.num_audio_segments, 480000, generator=g)
        batches.append(batch)
    return batches


def run(args) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm import config
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training.step import forward_step

    distributed.initialize(args.tp, args.pp, seed=args.seed)
    cfg = config.load_model(
        "tiny",
        [f"tensor_model_parallel_size={args.tp}", f"pipeline_model_parallel_size={args.pp}",
         f"num_layers_in_first_pipeline_stage={args.first_stage_layers or 'null'}"],
    )
    model = build_model(cfg)
    if args.mode == "reference":
        full = {n: t.detach().clone() for n, t in parallel_layout.local_tensors(model).items()}
        torch.save(full, f"{args.dir}/weights.pt")
    else:
        full = torch.load(f"{args.dir}/weights.pt", weights_only=True)
        parallel_layout.load_full_state_dict(model, full)

    image_size = cfg.vision.model_config.vision_cfg.image_size
    batches = make_batches(model.layout, cfg.llm.vocab_size, args.microbatches, 2, args.seq_len, image_size, seed=7)
    if ps.get_tensor_model_parallel_rank() > 0:  # TP rank 0 encodes for its group (AVLLM.encode)
        batches = [{k: v for k, v in b.items() if k not in ("video", "audio")} for b in batches]
    fb = get_forward_backward_func()
    model.config.calculate_per_token_loss = False
    losses = fb(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=args.microbatches,
        seq_length=args.seq_len,
        micro_batch_size=2,
        forward_only=False,
    )
    grads = {n: p.grad.detach().clone() for n, p in parallel_layout.local_tensors(model).items() if isinstance(p, torch.nn.Parameter) and p.grad is not None}

    def logits_step(data_iterator, model):
        b = next(data_iterator)
        out = model(input_ids=b["input_ids"], video=b.get("video"), audio=b.get("audio"), runtime_gather_output=True)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach().clone()})

    logit_out = fb(
        forward_step_func=logits_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=args.microbatches,
        seq_length=args.seq_len,
        micro_batch_size=2,
        forward_only=True,
    )
    last = ps.is_pipeline_last_stage()
    result = {
        "losses": [d["lm loss"] for d in losses] if last else None,
        "logits": [d["logits"] for d in logit_out] if last else None,
        "grads": grads,
    }
    if args.mode == "reference":
        torch.save(result, f"{args.dir}/reference.pt")
        return {}

    ref = torch.load(f"{args.dir}/reference.pt", weights_only=True)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    params = parallel_layout.local_tensors(model)
    report = {"grad_max_abs_diff": 0.0, "grad_max_ref": 0.0, "num_grads": 0, "missing_grads": [],
              "num_layers": len(model.llm.decoder.layers)}
    for name, g in grads.items():
        if name not in ref["grads"]:
            report["missing_grads"].append(name)
            continue
        r = parallel_layout.tp_shard(name, ref["grads"][name], params[name], tp_rank, tp)
        report["grad_max_abs_diff"] = max(report["grad_max_abs_diff"], (g - r).abs().max().item())
        report["grad_max_ref"] = max(report["grad_max_ref"], r.abs().max().item())
        report["num_grads"] += 1
    if last:
        report["loss_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(result["losses"], ref["losses"]))
        report["logit_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(result["logits"], ref["logits"]))
    reports = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    # every reference grad must be produced by exactly one (pp stage, with all its tp ranks)
    names = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(names, sorted(grads))
    covered = set().union(*map(set, names))
    return {
        "ranks": reports,
        "uncovered_reference_grads": sorted(set(ref["grads"]) - covered),
        "trainable_reference_grads": len(ref["grads"]),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["reference", "compare"], required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dir", required=True)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--first-stage-layers", type=int, default=None, help="uneven pipeline split (stage 0's LLM layers)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = run(args)
    if torch.distributed.get_rank() == 0 and out:
        suffix = f"_first{args.first_stage_layers}" if args.first_stage_layers else ""
        with open(f"{args.dir}/report_tp{args.tp}_pp{args.pp}{suffix}.json", "w") as f:
            json.dump(out, f, indent=1)
    from nemo_avllm.runtime import distributed

    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
