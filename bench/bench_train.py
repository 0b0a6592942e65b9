"""Training throughput, model FLOPs, MFU and peak memory.

`--mode model` (default): megatron-core forward-backward + optimizer steps of one training stage
on synthetic micro-batches (every sample an <AUD_VIS> conversation filling `--seq-length`), on
any model config (`--model vicuna7b --num-layers 16`), with either cached-feature inputs (the
encoders' outputs, as training with a feature cache reads them) or `--encoders` (frozen ViT and
HTSAT in the loop; needs open_clip and laion_clap). Prints one line per run, and appends it to
`--out`:

    train stage=2 model=vicuna7b layers=16 impl=local seq=2048 mbs=2 gbs=16 tokens_per_s_per_gpu=...
          samples_per_s=... model_tflops_per_gpu=... mfu=... peak_mem_gib=... step_time_s=...

Model FLOPs (bench/RESULTS.md states the formula): per token, LLM forward 2·N + 4·L·s·h (N: LLM
weights that multiply, i.e. all but the input embedding; the attention term counts the full
s×s score matrix); stage 2 trains the LLM: ×3 (forward, input and weight gradients); stage 1
freezes it, but gradients still flow back through it to the projectors: ×2. Projectors forward
+ weight gradient; encoders forward only (counted by torch's FlopCounterMode on one sample).
MFU = model FLOPs per second per GPU / the card's dense bf16 peak.

`--packing on|off`: instead of sequences filled with synthetic tokens, samples whose lengths follow
the stage's real mix (`bench_packing.stage_lengths`: annotation fixtures, MAT ratios, the model's
T/N/K), one global batch padded to `--seq-length` (off) or packed (on, `data.packing`, THD with
Transformer Engine). Tokens, MFU and tokens/s then count useful (real) tokens only, and the
attention term uses the mean sample length; `useful_fraction` says how much of the computed
sequence was real.

`--mode pipeline`: the tiny config end to end through `avllm train` (data decoding with PyAV
workers vs the feature cache), as before:

    train mode=cache steps_per_s=... samples_per_s=... tokens_per_s=... step_time_s=...

Usage: python bench/bench_train.py --model vicuna7b --stage 2 --num-layers 16 --impl local
       python bench/bench_train.py --model vicuna7b --stage 2 --num-layers 4 --packing on
       python bench/bench_train.py --mode pipeline [--clips 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# dense bf16 peak (TFLOP/s) of the cards this runs on, by a substring of torch's device name
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("B200", 2250.0), ("L40S", 362.1))
# open_clip configs of the vision towers, for machines without open_clip (`--encoders` needs it)
OPEN_CLIP_CONFIGS = {
    "ViT-L-14-quickgelu": {"embed_dim": 768, "quick_gelu": True,
                           "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}},
}
STAGES = {1: "stage1_pretrain", 2: "stage2_finetune"}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def llm_flops_per_token(llm, seq: int, stage: int) -> float:
    """Model FLOPs of the LLM per token of a training step (see the module docstring)."""
    n = llm.num_parameters() - llm.padded_vocab_size * llm.hidden_size  # no FLOPs in the embedding lookup
    forward = 2 * n + 4 * llm.num_layers * seq * llm.hidden_size
    return forward * (3 if stage == 2 else 2)


def projector_flops_per_sample(model) -> float:
    """Forward + weight gradient of the three projectors for one <AUD_VIS> sample."""
    lay, h = model.layout, model.cfg.llm.hidden_size
    dv, da = model.cfg.vision.geometry()["width"], model.cfg.audio.width
    return 2 * 2 * h * ((lay.num_frames + lay.num_patches) * dv + lay.num_audio_segments * da)


def encoder_flops_per_sample(model, video, audio) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.vision(video[:1])
        model.audio(audio[:1])
    return float(counter.get_total_flops())


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def _model_overrides(args) -> list[str]:
    from nemo_avllm import config

    o = [f"model={args.model}", f"model.transformer_impl={args.impl}", f"model.params_dtype={args.dtype}",
         f"model.build_encoders={str(args.encoders).lower()}", f"model.seq_length={args.seq_length}",
         f"model.activations_checkpoint={str(args.recompute).lower()}", f"model.micro_batch_size={args.micro_batch}",
         f"model.global_batch_size={args.global_batch}"]
    if args.num_layers:
        o.append(f"model.llm.num_layers={args.num_layers}")
    if args.fp8:
        o.append(f"model.fp8={args.fp8}")
    vision = config.load_model(args.model).vision
    if not _importable("open_clip") and not vision.get("model_config"):
        if args.encoders or vision.model_name not in OPEN_CLIP_CONFIGS:
            raise SystemExit(f"open_clip is not installed: needed for {vision.model_name} (--encoders or an unknown tower)")
        c = OPEN_CLIP_CONFIGS[vision.model_name]
        v = c["vision_cfg"]
        o.append(f"model.vision.model_config={{embed_dim:{c['embed_dim']},quick_gelu:{str(c['quick_gelu']).lower()},"
                 f"vision_cfg:{{image_size:{v['image_size']},layers:{v['layers']},width:{v['width']},"
                 f"patch_size:{v['patch_size']}}}}}")
    return o


def run_model(args) -> str:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm import config
    from nemo_avllm.model.provider import DTYPES, build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training import optim
    from nemo_avllm.training.step import forward_step
    from nemo_avllm.training.synthetic_batches import synthetic_batches

    distributed.initialize(1, 1, seed=1234)
    gpu = distributed.has_gpu()
    device = distributed.device()
    cfg = config.load(STAGES[args.stage], _model_overrides(args)).model
    dtype = DTYPES[cfg.params_dtype]
    t_build = time.perf_counter()
    model = build_model(cfg)
    if gpu:
        model.cuda()
    ddp, optimizer = optim.setup_training(model, cfg, use_distributed_optimizer=gpu, gpu=gpu)
    t_build = time.perf_counter() - t_build
    n_mb = args.global_batch // args.micro_batch
    if args.packing != "none":
        batches, tokens, attn_seq, computed = length_mix_batches(model, cfg, args, device, dtype)
        n_mb = len(batches)
    else:
        batches = synthetic_batches(model, n_mb, args.micro_batch, args.seq_length, device, args.encoders, dtype,
                                    mix=args.mix)
        tokens = computed = args.global_batch * args.seq_length
        attn_seq = args.seq_length
    enc_flops = encoder_flops_per_sample(model, batches[0]["video"], batches[0]["audio"]) if args.encoders else 0.0
    fb = get_forward_backward_func()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        # rotated: the last micro-batch (whose gradients DDP's overlapped reduce tracks) changes
        # modality mix from step to step, as under MAT
        order = batches[step % n_mb:] + batches[:step % n_mb]
        losses = fb(forward_step_func=forward_step, data_iterator=iter(order), model=[ddp], num_microbatches=n_mb,
                    seq_length=args.seq_length, micro_batch_size=args.micro_batch, forward_only=False)  # PP=1
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    loss = sum(float(d["lm loss"][0]) for d in losses) / max(1.0, sum(float(d["lm loss"][1]) for d in losses))
    step_time = statistics.median(times)
    flops = (tokens * llm_flops_per_token(model.cfg.llm, attn_seq, args.stage)
             + args.global_batch * (projector_flops_per_sample(model) + enc_flops))
    world = torch.distributed.get_world_size()
    achieved = flops / step_time / world
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if gpu else None)
    mfu = f"{achieved / (peak * 1e12):.3f}" if peak else "n/a"
    mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    line = (f"train stage={args.stage} model={args.model} layers={model.cfg.llm.num_layers} impl={model.cfg.transformer_impl} "
            f"fp8={args.fp8 or 'off'} inputs={'encoders' if args.encoders else 'features'} recompute={args.recompute} mix={args.mix} "
            f"seq={args.seq_length} "
            f"mbs={args.micro_batch} gbs={args.global_batch} tokens_per_s_per_gpu={tokens / step_time / world:.0f} "
            f"samples_per_s={args.global_batch / step_time:.2f} model_tflops_per_gpu={achieved / 1e12:.1f} mfu={mfu} "
            f"peak_mem_gib={mem:.1f} step_time_s={step_time:.3f} loss={loss:.3f} build_s={t_build:.1f} device={name.replace(' ', '_')}"
            f" packing={args.packing} useful_fraction={tokens / computed:.3f} micro_batches={n_mb}")
    distributed.destroy()
    return line


def length_mix_batches(model, cfg, args, device, dtype):
    """One global batch of the stage's real length mix, padded or packed (see the docstring):
    (micro-batches, useful tokens, mean sample length, token positions computed)."""
    import torch

    from nemo_avllm.data.collate import collate_av
    from nemo_avllm.data.packing import collate_packed, make_spec

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_packing

    if args.encoders:
        raise SystemExit("--packing runs on cached-feature inputs; drop --encoders")
    lengths = bench_packing.stage_lengths(args.stage, model.layout, args.seq_length)
    (share,) = bench_packing.draw_steps(lengths, dict(cfg.data.mat_ratios), args.global_batch, 1, 1)[0]
    g = torch.Generator().manual_seed(0)
    items = bench_packing.synthetic_items(model.layout, share, 0, model.cfg.vision.geometry()["width"],
                                          model.cfg.audio.width, args.seq_length, g)
    if args.packing == "on":
        spec = make_spec(args.seq_length, args.micro_batch, False, model.cfg.transformer_impl == "transformer_engine")
        batches = collate_packed(items, spec, collate_av)
        computed = sum(int(b["pack_shape"].prod()) for b in batches)
    else:
        mbs = args.micro_batch
        batches = [collate_av(items[i:i + mbs], args.seq_length) for i in range(0, len(items), mbs)]
        computed = len(items) * args.seq_length

    def to(x):
        if isinstance(x, dict):
            return {k: to(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if x.is_floating_point() else x.to(device)
        return x

    useful = sum(len(it["tokens"].input_ids) for it in items)
    return [to(b) for b in batches], useful, statistics.mean(share), computed


def run_pipeline(args) -> list[str]:
    from nemo_avllm import config
    from nemo_avllm.data.prepare import prepare
    from nemo_avllm.data.tokenizer import train_sentencepiece
    from nemo_avllm.demo import clips
    from nemo_avllm.training.callbacks import read_metrics
    from nemo_avllm.training.feature_cache import build_feature_cache
    from nemo_avllm.training.train import train

    work = Path(args.workdir)
    paths = clips.generate(work / "data", args.clips, 0, seed=1)
    train_sentencepiece(clips.corpus(paths), work / "tokenizer", vocab_size=512)
    prepare(str(paths["stage2"]), work / "prepared", progress=False)
    build_feature_cache(work / "prepared", work / "features", config.load_model("tiny", ["allow_random_init=true"]), index=work / "prepared",
                        dtype="fp32", progress=False)
    lines = []
    for mode in ("decode", "cache"):
        name = f"bench_{mode}"
        cfg = config.load("stage2_finetune", [
            "model=tiny", f"name={name}", f"model.tokenizer={work / 'tokenizer'}",
            f"model.data.train_manifest={paths['stage2']}", f"model.data.index={work / 'prepared'}",
            f"model.data.feature_cache={work / 'features' if mode == 'cache' else 'null'}",
            f"model.data.num_workers={0 if mode == 'cache' else args.workers}", "model.data.decode_backend=cpu",
            "model.restore_from=null", "model.allow_random_init=true", f"trainer.max_steps={args.steps}", "trainer.devices=1",
            "trainer.enable_progress_bar=false", f"exp_manager.exp_dir={work / 'runs'}",
            "exp_manager.resume_if_exists=false", "exp_manager.create_checkpoint_callback=false",
            f"model.micro_batch_size={args.micro_batch}", f"model.global_batch_size={args.global_batch}",
            "model.seq_length=160", "model.activations_checkpoint=false", "model.optim.lr=1e-3",
        ])
        _, _, log_dir = train(cfg)
        m = read_metrics(log_dir)[-args.steps:][2:]  # drop warm-up steps (worker start, first batches)
        step = statistics.median(x["step_time_s"] for x in m)
        tokens = statistics.median(x["tokens_per_s"] for x in m)
        lines.append(f"train mode={mode} model=tiny gbs={args.global_batch} steps_per_s={1 / step:.3f} "
                     f"samples_per_s={args.global_batch / step:.1f} tokens_per_s={tokens:.0f} step_time_s={step:.3f}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["model", "pipeline"], default="model")
    ap.add_argument("--model", default="vicuna7b", help="conf/model/<name>.yaml")
    ap.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: LLM frozen; 2: LLM trained")
    ap.add_argument("--impl", default="auto", choices=["auto", "local", "transformer_engine"])
    ap.add_argument("--num-layers", type=int, default=None, help="LLM layers (default: the config's)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--mix", default="mat", choices=["mat", "av"],
                    help="mat: V-only, A-only, AV and mixed micro-batches (MAT); av: every sample <AUD_VIS>")
    ap.add_argument("--fp8", default=None, choices=["hybrid", "e4m3"], help="FP8 with Transformer Engine (Hopper+)")
    ap.add_argument("--encoders", action="store_true", help="frozen encoders in the loop on synthetic media")
    ap.add_argument("--packing", choices=["none", "on", "off"], default="none",
                    help="on/off: the stage's real length mix, packed or padded; MFU on useful tokens")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    ap.add_argument("--out", default=None, help="append the result line(s) to this file")
    # --mode pipeline
    ap.add_argument("--clips", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers when decoding")
    ap.add_argument("--workdir", default="/tmp/avllm_bench_train")
    args = ap.parse_args(argv)
    if args.global_batch % args.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    lines = [run_model(args)] if args.mode == "model" else run_pipeline(args)
    for line in lines:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
