"""`avllm evaluate benchmark=NAME`: zero-shot evaluation on one of the paper's benchmarks.

1. read the official annotation files (`benchmarks.py`); check every video exists under the
   benchmark's `video_root`: missing ones are counted and listed in `missing_videos.txt`, never
   silently dropped (they are left out of the scores, and the results say how many);
2. answer every question, sharded over data-parallel ranks (item i goes to rank i mod DP); each
   rank appends `{qid: prediction}` lines to its own `predictions.rank<r>.jsonl` as it goes, so a
   crashed run resumes where it stopped and the result does not depend on order or rank count;
3. rank 0 merges the predictions and scores them (`metrics.py`, `judge.py`), writing one
   `results.json` and one `results.md` (benchmark, metric, N, judge, checkpoint, date).

`avllm evaluate compare=[RUN_DIR1,RUN_DIR2]` sets finished runs side by side with the paper's numbers.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nemo_avllm import modality
from nemo_avllm.data.media import MediaError
from nemo_avllm.evaluation import benchmarks, metrics

log = logging.getLogger(__name__)

# The paper's own numbers ("Ours", Tables 2-4): QA/choice accuracy %, captions CIDEr, FAVDBench BLEU-1.
PAPER = {"msrvtt_qa": 60.4, "msvd_qa": 72.1, "activitynet_qa": 50.6, "avsd": 53.4, "avssd": 48.3,
         "music_avqa": 47.9, "vatex_cap": 51.4, "valor_cap": 30.3, "avsd_cap": 76.8, "nextqa": 59.7,
         "mvbench": 44.6, "favdbench": 26.1}


def _items(bench) -> list[benchmarks.EvalItem]:
    kwargs = {k: bench[k] for k in benchmarks.READERS[bench.reader].files if bench.get(k) is not None}
    kwargs.update({k: bench[k] for k in ("video_ext", "subset") if bench.get(k) is not None})
    return benchmarks.read(bench.reader, **kwargs)


def _turns(item: benchmarks.EvalItem, kind: str, token: str, bench) -> list[dict]:
    """The conversation asked: earlier dialog turns (AVSD) then the question, the modality token
    in the first human turn."""
    if kind == "choice":
        q = metrics.choice_prompt(item.question, item.options or [])
    elif kind == "caption":
        q = bench.caption_prompt
    else:
        q = item.question + (bench.get("answer_hint") or "")
    turns = []
    for hq, ha in item.history:
        turns += [{"from": "human", "value": hq}, {"from": "gpt", "value": ha}]
    turns.append({"from": "human", "value": q})
    turns[0] = {"from": "human", "value": f"{token} {turns[0]['value']}"}
    return turns


def _rank_info(backend) -> tuple[int, int, bool]:
    """(data-parallel rank, DP size, writes): one writer per tensor-parallel group."""
    import torch

    if backend.name == "megatron":
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_rank() == 0
    import os

    if not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")  # torchrun with an export folder: every rank is a DP rank
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), True
    return 0, 1, True


def read_predictions(out: Path) -> dict[str, dict]:
    """All ranks' prediction lines; a line cut by a crash is ignored (that question is redone)."""
    preds = {}
    for f in sorted(out.glob("predictions.rank*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            preds[str(rec["qid"])] = rec
    return preds


def predict(cfg, backend, items, out: Path) -> dict:
    """Answer this rank's share of `items` not answered yet; returns counts."""
    from nemo_avllm.inference.run import Question, answer_batch, choose_modality, sampling_config

    bench = cfg.benchmark
    kind = benchmarks.READERS[bench.reader].kind
    root = Path(bench.video_root)
    rank, world, writes = _rank_info(backend)
    done = read_predictions(out)
    mine = [it for i, it in enumerate(items) if i % world == rank and it.qid not in done]
    forced = modality.VIS_TOKEN if cfg.visual_only else cfg.get("modality", "auto")
    sampling = sampling_config(cfg)
    bad = []
    path = out / f"predictions.rank{rank}.jsonl"
    bs = int(cfg.batch_size)
    with path.open("a") as f:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # a line cut by a crash stays alone (and is ignored)
        for s in range(0, len(mine), bs):
            qs = []
            for it in mine[s: s + bs]:
                video = root / it.video
                try:
                    token = choose_modality(video, forced)
                except MediaError as e:
                    bad.append({"qid": it.qid, "video": str(video), "reason": e.reason})
                    continue
                audio = str(root / it.audio) if it.audio else None
                qs.append(Question(it.qid, str(video), audio, _turns(it, kind, token, bench), token))
            if not qs:
                continue
            try:
                gens = answer_batch(backend, qs, sampling)
            except MediaError:  # find the culprit(s) one by one, answer the rest
                gens = []
                for q in list(qs):
                    try:
                        gens += answer_batch(backend, [q], sampling)
                    except MediaError as e:
                        bad.append({"qid": q.id, "video": q.video, "reason": e.reason})
                        qs.remove(q)
            if writes:
                for q, g in zip(qs, gens):
                    f.write(json.dumps({"qid": q.id, "prediction": g.text, "modality": q.token, "finish": g.finish}) + "\n")
                f.flush()
            print(f"[evaluate] rank {rank}: {min(s + bs, len(mine))}/{len(mine)}", file=sys.stderr)
    if bad and writes:
        with (out / f"bad_media.rank{rank}.jsonl").open("a") as f:
            for b in bad:
                f.write(json.dumps(b) + "\n")
    return {"answered_now": len(mine) - len(bad), "bad_media": len(bad)}


def score(cfg, items, preds: dict[str, str]) -> dict:
    bench = cfg.benchmark
    kind = benchmarks.READERS[bench.reader].kind
    out = {}
    for metric in bench.metrics:
        if metric == "exact":
            out["exact"] = metrics.exact_accuracy(preds, items)
        elif metric == "choice":
            out["choice"] = metrics.choice_accuracy(preds, items)
        elif metric == "label":
            out["label"] = metrics.label_accuracy(preds, items)
        elif metric == "caption":
            out["caption"] = metrics.caption_scores(preds, items)
        elif metric == "judge":
            if not cfg.judge.enabled:
                out["judge"] = {"skipped": "judge.enabled=false"}
                continue
            from nemo_avllm.evaluation.judge import Judge, JudgeConfig, judge_qa

            judge = Judge(JudgeConfig(**OmegaConf.to_container(cfg.judge.client, resolve=True)))
            out["judge"] = judge_qa(judge, preds, items, list(cfg.judge.dimensions or []))
        else:
            raise ValueError(f"benchmark.metrics: unknown metric {metric!r} (exact, choice, label, caption, judge)")
    out["kind"] = kind
    return out


def headline(scores: dict, name: str = "") -> tuple[str, float | None]:
    """The number the paper reports for this benchmark (in %, CIDEr x 100), from our scores."""
    if name == "favdbench" and "BLEU-1" in scores.get("caption", {}):
        return "caption:BLEU-1", 100.0 * scores["caption"]["BLEU-1"]  # Table 4 reports BLEU-1
    for key, field in (("judge", "accuracy"), ("choice", "accuracy"), ("exact", "accuracy"), ("caption", "CIDEr"),
                       ("label", "accuracy")):
        s = scores.get(key) or {}
        if field in s:
            return f"{key}:{field}", 100.0 * s[field]
    return "-", None


def _markdown(res: dict) -> str:
    lines = ["| benchmark | metric | value | N | missing videos | judge | checkpoint | date |", "|---|---|---|---|---|---|---|---|"]
    metric, value = res["headline"]["metric"], res["headline"]["value"]
    judge = res["scores"].get("judge", {}).get("judge", {}).get("model", "-")
    n = next((s.get("n") for s in res["scores"].values() if isinstance(s, dict) and "n" in s), 0)
    lines.append(f"| {res['benchmark']} | {metric} | {'-' if value is None else f'{value:.1f}'} | {n} | "
                 f"{res['missing_videos']} | {judge} | {res['checkpoint']} | {res['date']} |")
    extra = []
    for name, s in res["scores"].items():
        if isinstance(s, dict):
            for k, v in s.items():
                if isinstance(v, float):
                    extra.append(f"- {name}.{k}: {v:.4f}")
                elif k in ("unparseable", "bad_media"):
                    extra.append(f"- {name}.{k}: {v}")
                elif k == "by_type":
                    extra += [f"- {name}.{k}.{g}: {a:.4f}" for g, a in v.items()]
    return "\n".join(lines + [""] + extra) + "\n"


def compare(runs: list[str]) -> str:
    """Finished runs side by side with the paper's number per benchmark."""
    rows = [json.loads((Path(r) / "results.json").read_text()) for r in runs]
    benches = sorted({r["benchmark"] for r in rows})
    head = "| benchmark | paper | " + " | ".join(Path(r).name for r in runs) + " |"
    lines = [head, "|---|---|" + "---|" * len(runs)]
    for b in benches:
        cells = []
        for r in rows:
            v = r["headline"]["value"] if r["benchmark"] == b else None
            cells.append("-" if v is None else f"{v:.1f}")
        lines.append(f"| {b} | {PAPER.get(b, '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg) -> int:
    if cfg.get("compare"):  # compare=[RUN1,RUN2] (Hydra reads an unquoted a,b as a sweep)
        runs = cfg.compare if OmegaConf.is_list(cfg.compare) else str(cfg.compare).split(",")
        print(compare([str(r) for r in runs]))
        return 0
    from nemo_avllm.inference.backends import load_backend

    bench = cfg.benchmark
    out = Path(cfg.out_dir) / (cfg.get("run_name") or f"{bench.name}{'_vis' if cfg.visual_only else ''}")
    out.mkdir(parents=True, exist_ok=True)
    items = _items(bench)
    root = Path(bench.video_root)
    missing = sorted({str(root / it.video) for it in items if not (root / it.video).is_file()}
                     | {str(root / it.audio) for it in items if it.audio and not (root / it.audio).is_file()})
    missing_set = set(missing)
    present = [it for it in items if str(root / it.video) not in missing_set
               and not (it.audio and str(root / it.audio) in missing_set)]
    (out / "missing_videos.txt").write_text("".join(m + "\n" for m in missing))
    if missing:
        print(f"[evaluate] {len(missing)} media files missing under {root} (listed in {out / 'missing_videos.txt'}); "
              f"{len(items) - len(present)} of {len(items)} questions cannot be answered", file=sys.stderr)
    backend = load_backend(cfg)
    counts = predict(cfg, backend, present, out)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    rank, _, _ = _rank_info(backend)
    if rank != 0 or not _rank_info(backend)[2]:
        return 0
    preds = {q: r["prediction"] for q, r in read_predictions(out).items()}
    scores = score(cfg, present, preds)
    metric, value = headline(scores, bench.name)
    bad = sum(len(f.read_text().splitlines()) for f in out.glob("bad_media.rank*.jsonl"))
    res = {"benchmark": bench.name, "questions": len(items), "answered": len(preds), "missing_videos": len(missing),
           "bad_media": bad, "visual_only": bool(cfg.visual_only), "checkpoint": backend.source,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "headline": {"metric": metric, "value": value, "paper": PAPER.get(bench.name)},
           "sampling": OmegaConf.to_container(cfg.sampling, resolve=True), "this_run": counts,
           "scores": {k: ({kk: vv for kk, vv in v.items() if kk != "correct"} if isinstance(v, dict) else v)
                      for k, v in scores.items()}}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res)
    (out / "results.md").write_text(md)
    print(md)
    return 0
