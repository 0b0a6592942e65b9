"""`avllm evaluate benchmark=NAME`: zero-shot evaluation on one of the paper's benchmarks.

Before any model is loaded (`preflight.py`; a mistake ends in one line naming the key or file, exit code 2):
1. read the official annotation files (`benchmarks.py`); check every video exists under the
   benchmark's `video_root`: none found stops the run (naming the folder and the file pattern
   tried); missing ones are counted and listed in `missing_videos.txt`, never silently dropped;
2. build the judge and send it one request (`judge.Judge.probe`) when the benchmark needs it;
3. bind the run folder to what produces its answers (`run.json`: checkpoint and step, sampling,
   annotation files and their hashes, prompt settings): a rerun with anything different is refused,
   naming the difference, so answers of another checkpoint are never reused.
Then:
4. answer every question, sharded over data-parallel ranks (item i goes to rank i mod DP); each
   rank appends `{qid: prediction}` lines to its own `predictions.rank<r>.jsonl` as it goes, so a
   crashed run resumes where it stopped and the result does not depend on order or rank count;
5. rank 0 merges the predictions and scores them (`metrics.py`, `judge.py`), writing one
   `results.json` and one `results.md`: judge-free metrics first, so they are written even when
   the judge fails; a run that answered fewer questions than the benchmark has is marked partial.

`avllm evaluate benchmark=NAME predictions=FILE` scores a predictions file (the format step 4
writes, or a run folder) without loading a model. `avllm evaluate compare=[RUN_DIR1,RUN_DIR2]`
sets finished runs side by side with the paper's numbers, partial runs marked.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from nemo_avllm import modality
from nemo_avllm.data.index import read_jsonl
from nemo_avllm.media import MediaError
from nemo_avllm.errors import UserError
from nemo_avllm.evaluation import benchmarks, metrics, preflight

# The paper's own numbers ("Ours", Tables 2-4): QA/choice accuracy %, captions CIDEr, FAVDBench BLEU-1.
PAPER = {"msrvtt_qa": 60.4, "msvd_qa": 72.1, "activitynet_qa": 50.6, "avsd": 53.4, "avssd": 48.3,
         "music_avqa": 47.9, "vatex_cap": 51.4, "valor_cap": 30.3, "avsd_cap": 76.8, "nextqa": 59.7,
         "mvbench": 44.6, "favdbench": 26.1}


def _turns(item: benchmarks.EvalItem, kind: str, token: str, bench) -> list[dict]:
    """The conversation asked: earlier dialog turns (AVSD) then the question, the modality token
    in the first human turn (as `avllm generate` puts it)."""
    from nemo_avllm.inference.tasks import question_turn

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
    turns[0] = question_turn(turns[0]["value"], token)
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
        for rec in read_jsonl(f):
            preds[str(rec["qid"])] = rec
    return preds


def predict(cfg, backend, items, out: Path) -> dict:
    """Answer this rank's share of `items` not answered yet; returns counts."""
    from nemo_avllm.inference.tasks import Question, answer_batch, choose_modality, sampling_config

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


def build_judge(cfg):
    """The judge, checked with one request, when the benchmark is scored by it (else None); only
    on global rank 0, the rank that scores (torchrun ends the others when it fails)."""
    import os

    if "judge" not in list(cfg.benchmark.metrics) or not cfg.judge.enabled or int(os.environ.get("RANK", "0")) != 0:
        return None
    from nemo_avllm.evaluation.judge import Judge, JudgeConfig

    try:
        jc = JudgeConfig(**OmegaConf.to_container(cfg.judge.client, resolve=True))
    except TypeError as e:
        raise UserError(f"judge.client: {e}; `avllm evaluate --help` lists the judge.client keys") from e
    judge = Judge(jc)
    print(f"[evaluate] judge {jc.model} at {jc.base_url}: answered as {judge.probe()}", file=sys.stderr)
    return judge


def score(cfg, items, preds: dict[str, str], judge=None) -> dict:
    """Judge-free metrics first, then the judge's: a judge that fails leaves the others (and says
    why in `scores.judge.error`)."""
    bench = cfg.benchmark
    kind = benchmarks.READERS[bench.reader].kind
    out = {}
    metrics_ = list(bench.metrics)
    for metric in sorted(metrics_, key=lambda m: m == "judge"):
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
            from nemo_avllm.evaluation.judge import judge_qa
            from nemo_avllm.runtime.openai_client import LLMError

            try:
                judge = judge or build_judge(cfg)
                out["judge"] = judge_qa(judge, preds, items, list(cfg.judge.dimensions or []))
            except (LLMError, UserError) as e:
                out["judge"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[evaluate] the judge failed ({e}); the other metrics are written", file=sys.stderr)
        else:
            raise ValueError(f"benchmark.metrics: unknown metric {metric!r} (exact, choice, label, caption, judge)")
    out = {m: out[m] for m in [x for x in ("exact", "choice", "label", "caption", "judge") if x in out]}
    out["kind"] = kind
    return out


def headline(scores: dict, name: str = "") -> tuple[str, float | None]:
    """The number the paper reports for this benchmark (in %, CIDEr x 100), from our scores."""
    if name == "favdbench" and "BLEU-1" in scores.get("caption", {}):
        return "caption:BLEU-1", 100.0 * scores["caption"]["BLEU-1"]  # Table 4 reports BLEU-1
    for key, field in (("judge", "accuracy"), ("choice", "accuracy"), ("exact", "accuracy"), ("caption", "CIDEr"),
                       ("label", "accuracy")):
        s = scores.get(key) or {}
        if s.get(field) is not None:
            return f"{key}:{field}", 100.0 * s[field]
    return "-", None


def _value(res: dict) -> str:
    """The headline as a table cell; a partial run says so (answered of the benchmark's questions)."""
    value = res["headline"]["value"]
    cell = "-" if value is None else f"{value:.1f}"
    if res.get("partial"):
        cell += f" (partial: {res['answered']}/{res['questions']})"
    return cell


def _markdown(res: dict) -> str:
    lines = ["| benchmark | metric | value | N | missing videos | judge | checkpoint | step | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    metric = res["headline"]["metric"]
    j = res["scores"].get("judge", {})
    judge = (j.get("judge", {}).get("model", "-") if "error" not in j else "failed") if j else "-"
    n = next((s.get("n") for s in res["scores"].values() if isinstance(s, dict) and "n" in s), 0)
    lines.append(f"| {res['benchmark']} | {metric} | {_value(res)} | {n} | "
                 f"{res['missing_videos']} | {judge} | {res['checkpoint']} | {res.get('step', '-')} | {res['date']} |")
    extra = []
    for name, s in res["scores"].items():
        if isinstance(s, dict):
            for k, v in s.items():
                if isinstance(v, float):
                    extra.append(f"- {name}.{k}: {v:.4f}")
                elif k in ("unparseable", "bad_media", "error", "tokenizer", "served_model"):
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
            cells.append(_value(r) if r["benchmark"] == b else "-")
        lines.append(f"| {b} | {PAPER.get(b, '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_prediction_file(path: Path, items: list[benchmarks.EvalItem], name: str) -> dict[str, str]:
    """`{qid: prediction}` of a file in the format `predict` writes (or of a run folder);
    refuses lines that are not that format and ids the benchmark does not have."""
    if path.is_dir():
        recs = read_predictions(path)
        if not recs:
            raise UserError(f"predictions={path}: no predictions.rank*.jsonl in the folder")
    elif path.is_file():
        recs = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                recs[str(rec["qid"])] = rec
                str(rec["prediction"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"predictions={path}:{n}: expected a JSON line with 'qid' and 'prediction' "
                                f"(the format avllm evaluate writes), got {line[:80]!r}") from e
    else:
        raise UserError(f"predictions={path} does not exist; give a predictions .jsonl file or an evaluate run folder")
    known = {it.qid for it in items}
    stray = [q for q in recs if q not in known]
    if stray:
        raise UserError(f"predictions={path}: {len(stray)} of {len(recs)} question ids (e.g. {stray[0]!r}) are not in "
                        f"benchmark {name}; is it the predictions file of this benchmark and annotation file?")
    return {q: str(r["prediction"]) for q, r in recs.items()}


def write_results(cfg, out: Path, items, present, missing: list[str], preds: dict[str, str], judge, identity: dict,
                  counts: dict) -> int:
    """Score and write results.json / results.md; exit code 1 when the judge failed."""
    bench = cfg.benchmark
    scores = score(cfg, present, preds, judge)
    metric, value = headline(scores, bench.name)
    bad = sum(len(f.read_text().splitlines()) for f in out.glob("bad_media.rank*.jsonl"))
    answered = sum(1 for it in items if it.qid in preds)
    model = identity.get("model", {})
    res = {"benchmark": bench.name, "questions": len(items), "answered": answered, "partial": answered < len(items),
           "missing_videos": len(missing), "bad_media": bad, "visual_only": bool(cfg.visual_only),
           "checkpoint": model.get("checkpoint") or model.get("hf") or model.get("predictions"), "step": model.get("step"),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "headline": {"metric": metric, "value": value, "paper": PAPER.get(bench.name)},
           "sampling": OmegaConf.to_container(cfg.sampling, resolve=True), "this_run": counts, "run": identity,
           "scores": {k: ({kk: vv for kk, vv in v.items() if kk != "correct"} if isinstance(v, dict) else v)
                      for k, v in scores.items()}}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res)
    (out / "results.md").write_text(md)
    print(md)
    if res["partial"]:
        print(f"[evaluate] partial: {answered} of {len(items)} questions answered (missing media: {out / 'missing_videos.txt'})",
              file=sys.stderr)
    return 1 if "error" in scores.get("judge", {}) else 0


def score_predictions(cfg) -> int:
    """`predictions=FILE`: score an existing predictions file; no model is loaded."""
    bench = cfg.benchmark
    items = preflight.read_items(bench)
    path = Path(cfg.predictions)
    preds = read_prediction_file(path, items, bench.name)
    run_folder = path if path.is_dir() else path.parent
    bound = run_folder / "run.json"
    identity = json.loads(bound.read_text()) if bound.is_file() else {
        "model": {"predictions": str(path.resolve()), "sha256": None if path.is_dir() else preflight.file_sha256(path)}}
    out = Path(cfg.out_dir) / cfg.run_name if cfg.get("run_name") else (
        path if path.is_dir() else path.with_name(path.stem + ".scored"))
    out.mkdir(parents=True, exist_ok=True)
    judge = build_judge(cfg)
    return write_results(cfg, out, items, items, [], preds, judge, identity, {"answered_now": 0, "scored_file": str(path)})


def main(cfg) -> int:
    if cfg.get("compare"):  # compare=[RUN1,RUN2] (Hydra reads an unquoted a,b as a sweep)
        runs = cfg.compare if OmegaConf.is_list(cfg.compare) else str(cfg.compare).split(",")
        print(compare([str(r) for r in runs]))
        return 0
    if cfg.get("predictions"):
        return score_predictions(cfg)
    bench = cfg.benchmark
    out = Path(cfg.out_dir) / (cfg.get("run_name") or f"{bench.name}{'_vis' if cfg.visual_only else ''}")
    # everything that can be wrong is checked before the model loads
    items = preflight.read_items(bench)
    present, missing = preflight.check_media(bench, items)
    identity = preflight.run_identity(cfg)
    judge = build_judge(cfg)
    preflight.bind_run_dir(out, identity)
    (out / "missing_videos.txt").write_text("".join(m + "\n" for m in missing))
    if missing:
        print(f"[evaluate] {len(missing)} media files missing under {bench.video_root} (listed in {out / 'missing_videos.txt'}); "
              f"{len(items) - len(present)} of {len(items)} questions cannot be answered", file=sys.stderr)
    from nemo_avllm.inference.backends import load_backend

    backend = load_backend(cfg)
    counts = predict(cfg, backend, present, out)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    rank, _, writes = _rank_info(backend)
    if rank != 0 or not writes:
        return 0
    preds = {q: r["prediction"] for q, r in read_predictions(out).items()}
    return write_results(cfg, out, items, present, missing, preds, judge, identity, counts)
