"""Feature-cache throughput: frozen-encoder forward alone, and clips/s writing the cache.

    python bench/bench_features.py [--model tiny] [--clips 16] [--seconds 4] [--batch-size 8]

Makes `--clips` H.264+AAC clips (320x240, 30 fps) with ffmpeg, runs `prepare` (FLAC side-cars),
then `build_feature_cache` over them with the model config's encoders (random weights unless the
config names checkpoints: throughput does not depend on them). Prints machine-readable lines:

    encoders model=tiny device=cpu batch=8 clips_per_s=...      # vision + audio forward only
    features model=tiny device=cpu clips=16 clips_per_s=...     # decode + encode + write shards
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nemo_avllm import config  # noqa: E402
from nemo_avllm.data.feature_build import encode_clips  # noqa: E402
from nemo_avllm.data.prepare import prepare  # noqa: E402
from nemo_avllm.model.provider import avllm_config  # noqa: E402
from nemo_avllm.training.data import decode_settings  # noqa: E402
from nemo_avllm.training.feature_cache import build_encoders, build_feature_cache  # noqa: E402


def make_clips(workdir: Path, count: int, seconds: float) -> Path:
    lines = []
    for i in range(count):
        path = workdir / f"clip_{i}.mp4"
        if not path.exists():
            subprocess.run(
                ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=30:duration={seconds}",
                 "-f", "lavfi", "-i", f"sine=frequency={440 + 55 * i}:sample_rate=48000:duration={seconds}",
                 "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
                check=True)
        lines.append({"id": f"c{i}", "video": path.name,
                      "conversations": [{"from": "human", "value": "<AUD_VIS> Describe."}, {"from": "gpt", "value": "x"}]})
    manifest = workdir / "bench.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="conf/model/<name>.yaml")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    # throughput only: random encoder weights are fine here
    cfg = config.load_model(args.model, ["allow_random_init=true"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifest = make_clips(work, args.clips, args.seconds)
        prepare(manifest, work / "prep", num_workers=2, progress=False)
        torch.manual_seed(0)
        vision, audio = build_encoders(cfg, device)

        s = decode_settings(avllm_config(cfg))
        b = args.batch_size
        video = torch.randn(b, s.num_frames, 3, s.image_size, s.image_size)
        wave = 0.1 * torch.randn(b, s.num_audio_segments, s.window)
        encode_clips(vision, audio, list(video), list(wave), device)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            encode_clips(vision, audio, list(video), list(wave), device)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"encoders model={args.model} device={device} batch={b} "
              f"clips_per_s={reps * b / (time.perf_counter() - t0):.2f}")

        report = build_feature_cache(manifest, work / "cache", cfg, index=work / "prep", batch_size=b,
                                     encoders=(vision, audio), device=device, resume=False, progress=False)
        print(f"features model={args.model} device={device} clips={report.written} "
              f"clips_per_s={report.clips_per_s:.2f} failed={report.failed} shards={report.shards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
