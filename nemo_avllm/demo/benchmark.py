"""The demo's held-out clips as a benchmark in MUSIC-AVQA's official format, for `avllm evaluate`.

    python -m nemo_avllm.demo.benchmark checkpoints/demo      # writes checkpoints/demo/benchmark/avqa-test.json

One question per held-out clip and question family (the demo's eval manifest asks most of them
with several modality tokens; here the token is `avllm evaluate`'s to choose: the file's own,
`<AUD_VIS>` for a clip with sound, or `<VIS>` with `visual_only=true`), with MUSIC-AVQA's fields
(`anser` included) and the family as its question type, so the results break down per family.
Evaluating the demo checkpoint with and without `visual_only` gives its V vs AV table (paper
Fig. 5); the printed commands do it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nemo_avllm import modality


def write_music_avqa(eval_manifest: str | Path, out: str | Path) -> Path:
    """`out/avqa-test.json` from the demo's `eval.jsonl`; videos stay where they are (their
    `video_id` is the path relative to the manifest's folder, which is the video root)."""
    from nemo_avllm.data.manifest import iter_lines

    rows, seen = [], set()
    for n, line in iter_lines(Path(eval_manifest)):
        it = json.loads(line)
        video = Path(it["video"])
        if video.suffix != ".mp4" or video.is_absolute():
            raise ValueError(f"{eval_manifest}:{n}: video {video} is not a relative .mp4 path (the demo writes videos/<id>.mp4)")
        if (it["id"], it["family"]) in seen:
            continue
        seen.add((it["id"], it["family"]))
        question = modality.split_tokens(it["conversations"][-1]["value"])[1]
        rows.append({"video_id": str(video.with_suffix("")), "question_id": len(rows), "type": json.dumps(["demo", it["family"]]),
                     "question_content": question, "templ_values": "[]", "question_deleted": 0, "anser": it["answer"]})
    if not rows:
        raise ValueError(f"{eval_manifest} holds no held-out questions")
    path = Path(out) / "avqa-test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def evaluate_commands(demo_dir: str | Path, checkpoint: str | Path, annotations: Path, max_new_tokens: int = 32) -> list[list[str]]:
    """The `avllm evaluate` arguments of the demo's V vs AV table: AV run, V run, then compare."""
    demo_dir = Path(demo_dir)
    common = ["benchmark=music_avqa", "benchmark.name=demo_heldout", f"benchmark.annotations={annotations}",
              f"benchmark.video_root={demo_dir / 'data'}", "benchmark.answer_hint=null", f"checkpoint={checkpoint}",
              f"out_dir={demo_dir / 'eval'}", f"sampling.max_new_tokens={max_new_tokens}"]
    runs = [demo_dir / "eval" / "demo_heldout", demo_dir / "eval" / "demo_heldout_vis"]
    return [common, common + ["visual_only=true"], [f"compare=[{runs[0]},{runs[1]}]"]]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nemo_avllm.demo.benchmark DEMO_OUT_DIR   (the out_dir of `avllm demo`)", file=sys.stderr)
        return 2
    demo = Path(argv[0])
    manifest = demo / "data" / "eval.jsonl"
    if not manifest.is_file():
        print(f"{manifest} not found: run `avllm demo out_dir={demo}` first", file=sys.stderr)
        return 2
    ann = write_music_avqa(manifest, demo / "benchmark")
    last = sorted((demo / "runs" / "demo_stage2" / "checkpoints").glob("*-last"))
    ckpt = last[-1] if last else "<the demo's stage-2 checkpoint>"
    print(f"{ann}: {len(json.loads(ann.read_text()))} questions. The V vs AV table:")
    for args in evaluate_commands(demo, ckpt, ann):
        print("avllm evaluate " + " ".join(f"'{a}'" if "<" in a or "[" in a else a for a in args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
