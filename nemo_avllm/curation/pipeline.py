"""`avllm curate`: raw videos -> verified instruction manifests (paper §3.2, Table 1).

    captions (BLIP frames, CLAP tags)  ->  fusion (LLM: video, audio, audio-visual caption)
      ->  plan (Table 1 cells over the videos)  ->  generation (LLM, ROLE/REQUIREMENT/EXAMPLE/CONTEXT)
      ->  verification (MiniLM relevance, near-duplicates, LLM rubric)  ->  manifests + report

Outputs in `out_dir`: `stage1_descriptions.jsonl` (descriptions: stage-1 data),
`stage2_instructions.jsonl` (conversations + reasoning: stage-2 data), `captions.jsonl` (every
video's time-stamped and fused captions), `bad_videos.jsonl`, `report.json` (counts per stage,
what each filter dropped with examples, tokens, cost, cost per 1k videos). The manifests are
validated with the training's validator before the run ends.

Resumable: captions and every LLM reply are cached per video (`cache_dir`), so rerunning the same
command after a crash or with more videos pays only for what is new. One bad video or one failed
LLM call is reported and skipped; the run goes on. What is not one video's fault stops it
(`guard`): the endpoint and key are probed before captioning, `llm.max_consecutive_failures`
connection / authentication failures in a row end the run without marking videos bad, and
SIGINT / SIGTERM cancel the queued requests and end with exit 130 / 143.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from nemo_avllm.curation import guard, verify
from nemo_avllm.curation.cache import VideoCache
from nemo_avllm.curation.captions import VideoCaptions, caption_lines, caption_videos, resolve_device
from nemo_avllm.curation.instructions import Item, Request, STAGE1_TYPES, check_reply, plan, targets, to_manifest_line
from nemo_avllm.curation.prompts import PromptSet
from nemo_avllm.runtime.openai_client import ChatClient, LLMError, Usage, api_key

log = logging.getLogger(__name__)

STAGE1_NAME = "stage1_descriptions.jsonl"
STAGE2_NAME = "stage2_instructions.jsonl"
CONTEXT_KEY = {"V": "video", "A": "audio", "AV": "audio_visual"}


def _parallel(fn, jobs: list, workers: int, desc: str, progress: bool, breaker: guard.Breaker | None = None) -> list:
    """[(job, result or the exception it raised)] in job order, `workers` threads. When the breaker
    trips or the run is interrupted, the queued jobs are cancelled (those in flight finish and
    cache their replies) and the exception goes on."""
    from tqdm import tqdm

    results: list = [None] * len(jobs)
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            for f in as_completed(futures):
                i = futures[f]
                error = f.exception()
                results[i] = (jobs[i], error if error is not None else f.result())
                bar.update(1)
                if breaker is not None:
                    breaker.record(error)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def fuse(vc: VideoCaptions, prompts: PromptSet, llm: ChatClient, cache_root) -> dict:
    """{"video", "audio", "audio_visual"} captions of one video (audio ones None without audio)."""
    cache = VideoCache(cache_root, vc.id)
    out = {"video": llm.chat("fuse_video", prompts.fuse("video", captions=caption_lines(vc.frames)), cache),
           "audio": None, "audio_visual": None}
    if vc.has_audio and vc.audio:
        out["audio"] = llm.chat("fuse_audio", prompts.fuse("audio", captions=caption_lines(vc.audio, with_tags=True)), cache)
        out["audio_visual"] = llm.chat("fuse_audio_visual", prompts.fuse(
            "audio_visual", video_caption=out["video"], audio_caption=out["audio"]), cache)
    for k, v in out.items():
        if v is not None and not v.strip():
            raise LLMError(f"the {k} fusion reply is empty")
    return out


def generate(req: Request, context: str, prompts: PromptSet, llm: ChatClient, cache_root) -> Item:
    pairs = llm.chat(f"instruction_{req.itype}_{req.modality}", prompts.instruction(req.itype, req.modality, context),
                     VideoCache(cache_root, req.video_id), expect_json=True, validate=check_reply, variant=req.variant)
    return Item(req, check_reply(pairs), context)


def judge(item: Item, prompts: PromptSet, llm: ChatClient, cache_root) -> dict:
    r = item.request
    parsed = llm.chat(f"judge_{r.itype}_{r.modality}", prompts.judge_messages(r.itype, r.modality, item.context, item.text()),
                      VideoCache(cache_root, r.video_id), expect_json=True, validate=verify.check_judgment)
    return verify.check_judgment(parsed)


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def _tokens(messages: list[dict]) -> int:
    """Rough token count (4 characters a token) for the estimate; the real run reports exact usage."""
    return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)


def dry_run(captions: dict[str, VideoCaptions], prompts: PromptSet, requests: list[Request], cfg) -> str:
    """The prompts of the first video and an estimate of tokens and cost for the whole run."""
    est = cfg.llm.estimate_output_tokens
    f_out, i_out, j_out = int(est.fusion), int(est.instruction), int(est.judge)
    fill = "x" * (4 * f_out)  # a fused caption of the estimated length
    n_calls = p_tok = c_tok = 0
    for vc in captions.values():
        msgs = [prompts.fuse("video", captions=caption_lines(vc.frames))]
        if vc.has_audio and vc.audio:
            msgs += [prompts.fuse("audio", captions=caption_lines(vc.audio, with_tags=True)),
                     prompts.fuse("audio_visual", video_caption=fill, audio_caption=fill)]
        n_calls += len(msgs)
        p_tok += sum(_tokens(m) for m in msgs)
        c_tok += f_out * len(msgs)
    judging = bool(cfg.verify.judge.enabled)
    for r in requests:
        p_tok += _tokens(prompts.instruction(r.itype, r.modality, fill))
        c_tok += i_out
        n_calls += 1
        if judging:
            p_tok += _tokens(prompts.judge_messages(r.itype, r.modality, fill, "x" * 4 * i_out))
            c_tok += j_out
            n_calls += 1
    price_in, price_out = float(cfg.llm.price_per_1m_input), float(cfg.llm.price_per_1m_output)
    cost = (p_tok * price_in + c_tok * price_out) / 1e6
    lines = []
    if captions:
        vc = next(iter(captions.values()))
        shown = [("fusion: video", prompts.fuse("video", captions=caption_lines(vc.frames)))]
        if vc.has_audio and vc.audio:
            shown.append(("fusion: audio", prompts.fuse("audio", captions=caption_lines(vc.audio, with_tags=True))))
        first = next((r for r in requests if r.video_id == vc.id), None)
        if first is not None:
            shown.append((f"instruction: {first.itype}/{first.modality}",
                          prompts.instruction(first.itype, first.modality, "<the fused caption>")))
        for title, msgs in shown:
            lines.append(f"===== {title} ({vc.video}) =====")
            lines += [f"[{m['role']}]\n{m['content']}" for m in msgs]
    n = max(1, len(captions))
    lines.append(f"===== estimate ({cfg.llm.model} at ${price_in}/${price_out} per 1M input/output tokens) =====")
    lines.append(f"{len(captions)} videos, {len(requests)} items requested, {n_calls} LLM calls, "
                 f"~{p_tok} input + ~{c_tok} output tokens, ~${cost:.4f} (~${cost / n * 1000:.2f} per 1k videos)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def shard(items: list, spec) -> list:
    """Every `count`-th input from `index` on: disjoint jobs that together cover the input."""
    index, count = (int(spec.index), int(spec.count)) if spec else (0, 1)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard.index={index}, shard.count={count}: need count >= 1 and 0 <= index < count")
    return items[index::count]


def _write_jsonl(path: Path, rows, mask=None) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            line = json.dumps(r, ensure_ascii=False)
            f.write((mask(line) if mask else line) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def curate(cfg) -> dict:
    """The whole pipeline; returns the report (also written to `out_dir/report.json`)."""
    from nemo_avllm.data.manifest import read_inputs
    from nemo_avllm.data.manifest_checks import validate_manifest

    t0 = time.perf_counter()
    out = Path(str(cfg.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(str(cfg.cache_dir)) if cfg.get("cache_dir") else out / "cache"
    progress = bool(cfg.get("progress", True))
    prompts = PromptSet.load(cfg.prompts.get("dir"), cfg.prompts.version)
    items = shard(read_inputs(str(cfg.input)), cfg.get("shard"))
    by_id = {it.id: it for it in items}
    bad: list[dict] = []
    usage = Usage()
    llm = mask = None
    if not cfg.get("dry_run"):  # the endpoint and key, before hours of captioning
        llm = ChatClient(cfg.llm, prompts.version, usage)
        mask = guard.Masker(api_key(cfg.llm))
        guard.probe(llm, mask)

    captions = caption_videos(items, cfg.captions, cache_root, bad, progress=progress)
    cell_targets = targets(cfg.instructions, len(captions))
    if cfg.get("dry_run"):
        requests, _ = plan(cell_targets, {v: c.has_audio for v, c in captions.items()}, int(cfg.seed))
        print(dry_run(captions, prompts, requests, cfg))
        return {"dry_run": True, "videos": len(captions), "bad_videos": bad}

    workers = int(cfg.llm.max_concurrency)
    breaker = guard.Breaker(cfg.llm, int(cfg.llm.get("max_consecutive_failures") or 10), mask)

    fused: dict[str, dict] = {}
    unreachable = 0  # fusion failures that were the endpoint's, not the video's: not marked bad
    for vc, res in _parallel(lambda vc: fuse(vc, prompts, llm, cache_root), list(captions.values()), workers, "fusion",
                             progress, breaker):
        if isinstance(res, Exception):
            log.warning("curate: fusion failed for %s: %s", vc.video, mask(str(res)))
            if guard.failure_kind(res):
                unreachable += 1
            else:
                bad.append({"path": vc.video, "reason": f"fusion: {res}"[:400], "stage": "fusion"})
        else:
            fused[vc.id] = res
    _write_jsonl(out / "captions.jsonl", (dict(captions[v].to_dict(), fused=fused.get(v)) for v in captions), mask)

    # Targets follow the videos that made it through fusion.
    cell_targets = targets(cfg.instructions, len(fused))
    requests, shortfall = plan(cell_targets, {v: fused[v]["audio"] is not None for v in fused}, int(cfg.seed))
    gen_failures: list[dict] = []
    generated: list[Item] = []
    jobs = [(r, fused[r.video_id][CONTEXT_KEY[r.modality]]) for r in requests]
    for (r, _), res in _parallel(lambda job: generate(job[0], job[1], prompts, llm, cache_root), jobs, workers,
                                 "instructions", progress, breaker):
        if isinstance(res, Exception):
            gen_failures.append({"id": r.uid, "reason": f"{type(res).__name__}: {res}"[:400]})
        else:
            generated.append(res)

    vcfg = cfg.verify
    report = verify.FilterReport(max_examples=int(vcfg.get("max_examples", 3)))
    embed = verify.Embedder(vcfg.relevance.get("model"),
                            device=resolve_device(cfg.captions.get("device", "auto")))  # this task's GPU
    kept = verify.relevance(generated, embed, float(vcfg.relevance.min_similarity), report)
    kept = verify.dedup(kept, embed, float(vcfg.dedup.max_similarity), report)
    if vcfg.judge.enabled:
        judgments = {}
        for it, res in _parallel(lambda it: judge(it, prompts, llm, cache_root), kept, workers, "judge", progress, breaker):
            judgments[it.uid] = f"{type(res).__name__}: {res}"[:200] if isinstance(res, Exception) else res
        kept = verify.judge_filter(kept, judgments, vcfg.judge, report)

    def lines(stage1: bool):
        for it in kept:
            if (it.request.itype in STAGE1_TYPES) == stage1:
                src = by_id[it.request.video_id]
                yield to_manifest_line(it, src.video, src.audio)

    paths = {"stage1": out / STAGE1_NAME, "stage2": out / STAGE2_NAME}
    written = {"stage1": _write_jsonl(paths["stage1"], lines(True)), "stage2": _write_jsonl(paths["stage2"], lines(False))}
    _write_jsonl(out / "bad_videos.jsonl", bad, mask)

    validation = {}
    for name, p in paths.items():
        _, vrep = validate_manifest(p)
        validation[name] = {"kept": vrep.kept, "dropped": vrep.dropped, "problems": dict(vrep.counts)}

    kept_cells: dict[str, int] = {}
    for it in kept:
        k = f"{it.request.itype}/{it.request.modality}"
        kept_cells[k] = kept_cells.get(k, 0) + 1
    price_in, price_out = float(cfg.llm.price_per_1m_input), float(cfg.llm.price_per_1m_output)
    full_cost = usage.cost(price_in, price_out, include_cached=True)
    result = {
        "videos": {"input": len(items), "captioned": len(captions), "fused": len(fused), "bad": len(bad),
                   **({"llm_unreachable": unreachable} if unreachable else {})},
        "bad_videos": bad[:20],
        "targets": {f"{t}/{m}": n for (t, m), n in cell_targets.items()},
        "shortfall_no_audio_videos": shortfall,
        "generation": {"requested": len(requests), "generated": len(generated), "failed": len(gen_failures),
                       "failures": gen_failures[:5]},
        "filters": report.to_dict(),
        "kept": {"total": len(kept), **kept_cells},
        "manifests": {name: {"path": str(p), "lines": written[name], "validation": validation[name]}
                      for name, p in paths.items()},
        "usage": usage.to_dict(),
        "cost_usd": round(usage.cost(price_in, price_out), 6),
        "cost_usd_with_cached": round(full_cost, 6),
        "cost_per_1k_videos_usd": round(full_cost / max(1, len(fused)) * 1000, 4),
        "prompt_version": prompts.version,
        "model": str(cfg.llm.model),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    (out / "report.json").write_text(mask(json.dumps(result, indent=2, ensure_ascii=False)))
    print(summary(result, report))
    return result


def summary(r: dict, filters: verify.FilterReport) -> str:
    v, g, u = r["videos"], r["generation"], r["usage"]
    lines = [
        f"curate: {v['input']} videos, {v['captioned']} captioned, {v['fused']} fused, {v['bad']} bad (bad_videos.jsonl)",
        f"  instructions: {g['requested']} requested, {g['generated']} generated, {g['failed']} failed",
        "  verification:",
        str(filters),
        f"  kept {r['kept']['total']}: " + ", ".join(f"{k}={n}" for k, n in r["kept"].items() if k != "total"),
    ]
    for name, m in r["manifests"].items():
        lines.append(f"  {name}: {m['path']} ({m['lines']} lines; validation kept {m['validation']['kept']})")
    lines.append(f"  LLM: {u['calls']} calls ({u['cached_calls']} cached, {u['retries']} retries, {u['json_retries']} JSON "
                 f"re-asks, {u['failures']} failures), {u['prompt_tokens']} + {u['completion_tokens']} tokens, "
                 f"${r['cost_usd']:.4f} this run; ${r['cost_per_1k_videos_usd']:.2f} per 1k videos")
    if r["shortfall_no_audio_videos"]:
        lines.append(f"  not generated (no video with audio): {r['shortfall_no_audio_videos']}")
    return "\n".join(lines)


def run(cfg) -> int:
    """`avllm curate` / `scripts/curate.py` with a composed `conf/curate.yaml`."""
    try:
        with guard.SignalsInterrupt():
            r = curate(cfg)
    except guard.Interrupted as e:  # queued requests were cancelled; every cached reply is whole
        print(f"curate: stopped by {e} (queued LLM requests cancelled, cache consistent): rerun the same command "
              f"to resume", file=sys.stderr)
        return 128 + e.signum
    if r.get("dry_run"):
        return 0
    return 0 if r["kept"]["total"] or not r["videos"]["input"] else 1


if __name__ == "__main__":
    from nemo_avllm.cli import main

    sys.exit(main(["curate", *sys.argv[1:]]))
