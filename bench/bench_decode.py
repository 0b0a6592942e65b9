"""Decode throughput per back-end and codec, on clips generated with ffmpeg.

    python bench/bench_decode.py [--clips 3] [--seconds 10] [--repeat 2]

Makes `--clips` 640x360 30 fps clips per codec (H.264+AAC in MP4, VP9+Opus in WebM), runs
`prepare` on them (FLAC side-cars), then decodes each into the training contract (T=32 frames
at 224, K=4 audio segments) with every back-end available here: `cpu` (PyAV), `dali-cpu`
(VP9 only: DALI's CPU decoders read no H.264) and `dali-gpu` (when CUDA is present). Prints one
machine-readable line per back-end/codec:

    decode backend=cpu codec=h264 audio=container clips_per_s=... s_per_clip=...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dali_pipelines/ lives at the repo root

import torch  # noqa: E402

from nemo_avllm.data.media import dali_available, decode_clip  # noqa: E402
from nemo_avllm.data.index import load_index  # noqa: E402
from nemo_avllm.data.prepare import prepare  # noqa: E402

CODECS = {
    "h264": (".mp4", ["-c:v", "libx264", "-preset", "medium", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k"]),
    "vp9": (".webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1",
                      "-b:v", "1M", "-pix_fmt", "yuv420p", "-c:a", "libopus", "-b:a", "96k"]),
}


def make_clips(workdir: Path, codec: str, count: int, seconds: float, size: str) -> list[Path]:
    suffix, args = CODECS[codec]
    paths = []
    for i in range(count):
        path = workdir / f"{codec}_{i}{suffix}"
        if not path.exists():
            subprocess.run(
                ["ffmpeg", "-v", "error", "-y",
                 "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
                 "-f", "lavfi", "-i", f"sine=frequency={440 + 110 * i}:sample_rate=48000:duration={seconds}",
                 "-ac", "2", *args, "-shortest", str(path)],
                check=True,
            )
        paths.append(path)
    return paths


def time_decode(items, backend: str, repeat: int, **kw) -> float:
    """Seconds per clip (after one warm-up decode that builds pipelines / fills caches)."""
    decode_clip(items[0][0], audio_path=items[0][1], backend=backend, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        for video, audio in items:
            clip = decode_clip(video, audio_path=audio, backend=backend, **kw)
            assert clip.video.shape[0] == kw["num_frames"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (repeat * len(items))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--workdir", help="keep generated clips here (default: a temp dir)")
    args = ap.parse_args(argv)

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    kw = dict(num_frames=args.frames, num_segments=args.segments, image_size=args.image_size)
    gpu = torch.cuda.is_available()
    print(f"# {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"GPU: {torch.cuda.get_device_name() if gpu else 'none'}, clips {args.size} {args.seconds:g}s 30fps, "
          f"T={args.frames} S={args.image_size} K={args.segments}", flush=True)
    try:
        for codec in CODECS:
            clips = make_clips(workdir, codec, args.clips, args.seconds, args.size)
            t0 = time.perf_counter()
            report = prepare(clips, workdir / f"prep_{codec}", num_workers=1, resume=False, progress=False)
            dt = (time.perf_counter() - t0) / len(clips)
            print(f"prepare codec={codec} workers=1 clips_per_s={1 / dt:.2f} s_per_clip={dt:.3f}", flush=True)
            assert report.failed == 0, report
            flac = {r["path"]: r["flac"] for r in load_index(report.index_path)}
            container_items = [(str(c), None) for c in clips]
            flac_items = [(str(c), flac[str(c.resolve())]) for c in clips]
            runs = [("cpu", "cpu", "container", container_items), ("cpu", "cpu", "flac", flac_items)]
            if dali_available():
                if gpu:
                    runs.append(("dali-gpu", "dali", "flac", flac_items))
                elif codec == "vp9":
                    runs.append(("dali-cpu", "dali", "flac", flac_items))
            for name, backend, audio, items in runs:
                spc = time_decode(items, backend, args.repeat, **kw)
                print(f"decode backend={name} codec={codec} audio={audio} clips_per_s={1 / spc:.2f} "
                      f"s_per_clip={spc:.3f}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
