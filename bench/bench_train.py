"""Training throughput on the tiny config (CPU or GPU), with and without the feature cache.

Generates the demo's synthetic clips (ffmpeg), prepares them, caches encoder features, then runs
stage 2 (projectors + LLM trainable) for `--steps` steps twice: decoding media on the fly (frozen
encoders in the loop) and reading cached features. Prints one line per mode:

    train mode=cache steps_per_s=... samples_per_s=... tokens_per_s=... step_time_s=...

Usage: python bench/bench_train.py [--clips 128] [--steps 20] [--workdir /tmp/avllm_bench_train]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers when decoding")
    ap.add_argument("--workdir", default="/tmp/avllm_bench_train")
    args = ap.parse_args(argv)

    from nemo_avllm import config
    from nemo_avllm.data.features import build_feature_cache
    from nemo_avllm.data.prepare import prepare
    from nemo_avllm.data.tokenizer import train_sentencepiece
    from nemo_avllm.demo import synthetic
    from nemo_avllm.training.callbacks import read_metrics
    from nemo_avllm.training.train import train

    work = Path(args.workdir)
    paths = synthetic.generate(work / "data", args.clips, 0, seed=1)
    train_sentencepiece(synthetic.corpus(paths), work / "tokenizer", vocab_size=512)
    prepare(str(paths["stage2"]), work / "prepared", progress=False)
    build_feature_cache(work / "prepared", work / "features", config.load_model("tiny", ["allow_random_init=true"]), index=work / "prepared",
                        dtype="fp32", progress=False)
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
        print(f"train mode={mode} model=tiny gbs={args.global_batch} steps_per_s={1 / step:.3f} "
              f"samples_per_s={args.global_batch / step:.1f} tokens_per_s={tokens:.0f} step_time_s={step:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
