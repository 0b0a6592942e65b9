"""Useful-token fraction of padded vs packed micro-batches (issue 22), and the tiny model's CPU
training speed packed vs padded.

Sample lengths come from real annotation files (`/work/shared/fixtures/annotations`, or
`--annotations`), turned into the training conversations of each stage with the project's
template (Vicuna v1.1 system prompt, `Human:` / `Assistant:`, `</s>` after each answer):

- stage 1 (descriptions): `<VIS>` samples answer with an MSR-VTT caption, `<AUD>` and
  `<AUD_VIS>` samples with a VALOR-32K audio-visual description;
- stage 2 (instructions): one conversation per AVSD dialog: its question/answer turns, then
  "Describe the video in detail." answered by the dialog's caption and summary; every modality
  draws from the same dialogs (only the placeholders differ).

Tokens: no LLaMA tokenizer is available offline here, so text is counted as ceil(1.3 x words)
(LLaMA's SentencePiece averages about 1.3 tokens per English word), plus BOS, one EOS per answer
and the modality placeholders (T + N for <VIS>, K for <AUD>). Each step draws a global batch with
the stage config's MAT counts (largest remainder of `mat_ratios`), deals it over the data-parallel
ranks as `MATBatchSampler` does, and packs each rank's share with the training code
(`data.packing`, the layout of the run: Transformer Engine THD by default, `--layout local` for
rows). useful = real tokens / token positions the LLM computes. Prints

    useful_token_fraction stage1 padded=X packed=Y
    useful_token_fraction stage2 padded=X packed=Y
    packing_detail stage=1 ...                       (config, mean lengths, other layouts)
    cpu_train model=tiny packing=off steps_per_s=... useful_tokens_per_s=...
    cpu_train model=tiny packing=on  steps_per_s=... useful_tokens_per_s=... speedup=...

Usage: python bench/bench_packing.py [--steps 50] [--dp 8] [--cpu-steps 4] [--no-cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ANNOTATIONS = Path("/work/shared/fixtures/annotations")
TOKENS_PER_WORD = 1.3
STAGES = {1: "stage1_pretrain", 2: "stage2_finetune"}
TOKEN = {"V": "<VIS>", "A": "<AUD>", "AV": "<AUD_VIS>"}


def text_tokens(text: str) -> int:
    """The documented words -> tokens rule (see the module docstring)."""
    words = len(text.split())
    return math.ceil(TOKENS_PER_WORD * words) if words else 0


def conversation_length(turns: list[dict], layout, template) -> int:
    """Tokens of a conversation as `conversation.tokenize_conversation` lays it out."""
    n, prefix = 1, template.system_prompt  # BOS
    for turn in turns:
        if turn["from"] == "human":
            text = f"{prefix} {template.human_role}: {turn['value'].strip()} {template.assistant_role}:"
            for tok in TOKEN.values():
                while tok in text:
                    n += layout.length(tok)
                    text = text.replace(tok, "", 1)
            n += text_tokens(text)
        else:
            n += text_tokens(turn["value"]) + 1  # EOS
        prefix = ""
    return n


def stage_conversations(stage: int, root: Path = ANNOTATIONS) -> dict[str, list[list[dict]]]:
    """Per modality: the conversations (with a placeholder `{tok}` for the modality token)."""
    if stage == 1:
        msrvtt = json.loads((root / "captions" / "msrvtt_test_videodatainfo.first50videos.json").read_text())
        valor = json.loads((root / "valor32k" / "desc_test.head150.json").read_text())

        def desc(answer: str) -> list[dict]:
            return [{"from": "human", "value": "{tok} Describe the video."}, {"from": "gpt", "value": answer}]

        av = [desc(v["desc"]) for v in valor]
        return {"V": [desc(s["caption"]) for s in msrvtt["sentences"]], "A": av, "AV": av}
    avsd = json.loads((root / "avsd" / "lbl_test_set4DSTC7-AVSD.head150.json").read_text())
    convs = []
    for d in avsd["dialogs"]:
        turns = []
        for k, qa in enumerate(d["dialog"]):
            turns += [{"from": "human", "value": ("{tok} " if k == 0 else "") + qa["question"]},
                      {"from": "gpt", "value": qa["answer"]}]
        turns += [{"from": "human", "value": "Describe the video in detail."},
                  {"from": "gpt", "value": f"{d['caption']} {d['summary']}"}]
        convs.append(turns)
    return {"V": convs, "A": convs, "AV": convs}


def stage_lengths(stage: int, layout, seq_length: int, root: Path = ANNOTATIONS) -> dict[str, list[int]]:
    """Per modality: sample lengths, capped at `seq_length` (the tokenizer's max_length)."""
    from nemo_avllm.data.conversation import ConversationTemplate

    template = ConversationTemplate()
    out = {}
    for m, convs in stage_conversations(stage, root).items():
        out[m] = [min(seq_length, conversation_length(
            [{**t, "value": t["value"].replace("{tok}", TOKEN[m])} for t in c], layout, template)) for c in convs]
    return out


def stage_setup(stage: int, overrides=()):
    from nemo_avllm import config
    from nemo_avllm.model.provider import avllm_config

    cfg = config.load(STAGES[stage], ["model=vicuna7b", "model.restore_from=/x", *overrides])
    return cfg, avllm_config(cfg.model).layout()


def draw_steps(lengths: dict[str, list[int]], ratios: dict, gbs: int, dp: int, steps: int, seed: int = 0):
    """Per step, per rank: the lengths of the rank's share (MAT counts, dealt as the sampler does)."""
    from nemo_avllm.data.mat_sampler import largest_remainder, normalise_ratios, rank_labels

    norm = normalise_ratios(ratios, {m: len(v) for m, v in lengths.items()})
    counts = largest_remainder(norm, gbs)
    rng = random.Random(seed)
    return [[[rng.choice(lengths[m]) for m in labels] for labels in rank_labels(counts, seed, step, dp)]
            for step in range(steps)]


def fractions(steps, spec, seq_length: int) -> tuple[float, float]:
    """(padded, packed) useful fraction over all steps and ranks."""
    from nemo_avllm.data.packing import micro_batch_shape, plan_micro_batches

    real = padded = packed = 0
    for ranks in steps:
        for lengths in ranks:
            real += sum(lengths)
            padded += len(lengths) * seq_length
            for rows in plan_micro_batches(lengths, spec):
                r, s = micro_batch_shape(rows, lengths, spec)
                packed += r * s
    return real / padded, real / packed


def measure_fractions(args) -> list[str]:
    from nemo_avllm.data.packing import make_spec

    lines, details = [], []
    for stage in (1, 2):
        cfg, layout = stage_setup(stage)
        m = cfg.model
        seq, gbs, mbs = int(m.seq_length), int(m.global_batch_size), int(m.micro_batch_size)
        lengths = stage_lengths(stage, layout, seq, Path(args.annotations))
        steps = draw_steps(lengths, dict(m.data.mat_ratios), gbs, args.dp, args.steps, args.seed)
        main = make_spec(seq, mbs, False, args.layout == "thd")
        padded, packed = fractions(steps, main, seq)
        lines.append(f"useful_token_fraction stage{stage} padded={padded:.3f} packed={packed:.3f}")
        other = {name: fractions(steps, make_spec(seq, mbs, fixed, thd), seq)[1]
                 for name, fixed, thd in (("thd", False, True), ("local_rows", False, False),
                                          ("thd_pp_fixed", True, True), ("local_pp_fixed", True, False))}
        mean = {k: statistics.mean(v) for k, v in lengths.items()}
        details.append(
            f"packing_detail stage={stage} seq={seq} gbs={gbs} dp={args.dp} mbs={mbs} T={m.num_frames} "
            f"N={layout.num_patches} K={m.num_audio_segments} mat_ratios={dict(m.data.mat_ratios)} "
            f"mean_len_V={mean['V']:.0f} mean_len_A={mean['A']:.0f} mean_len_AV={mean['AV']:.0f} steps={args.steps} "
            f"layout={args.layout} " + " ".join(f"packed_{k}={v:.3f}" for k, v in other.items()))
    return lines + details


def synthetic_items(layout, lengths: list[int], step: int, dv: int, da: int, seq: int, g) -> list[dict]:
    """Loader items (random tokens, cached-feature inputs) with the given lengths, modalities
    V, A, AV in turn: a prompt, the placeholders, an answer (the loss) and EOS."""
    import torch

    from nemo_avllm import modality
    from nemo_avllm.data.conversation import TokenizedSample

    out = []
    for k, n in enumerate(lengths):
        m = ("V", "A", "AV")[(k + step) % 3]
        exp = layout.expansion(TOKEN[m])
        text = max(2, n - len(exp) - 2)
        q = torch.randint(3, 500, (text // 2,), generator=g).tolist()
        a = torch.randint(3, 500, (text - text // 2,), generator=g).tolist()
        ids = ([1] + q + exp + a + [2])[:seq]
        lab = ([modality.IGNORE_INDEX] * (1 + len(q) + len(exp)) + a + [2])[:seq]
        f = {}
        if "V" in m:
            f["temporal"] = torch.randn(layout.num_frames, dv, generator=g)
            f["spatial"] = torch.randn(layout.num_patches, dv, generator=g)
        if "A" in m:
            f["audio"] = torch.randn(layout.num_audio_segments, da, generator=g)
        out.append({"id": f"{step}.{k}", "modality": m, "tokens": TokenizedSample(ids, lab), "features": f})
    return out


def cpu_training(args) -> list[str]:
    """Tiny model, stage-2 training (projectors + LLM) on cached-feature inputs, sample lengths of
    the stage-2 mix for the tiny layout: steps/s and useful tokens/s padded vs packed."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm import config
    from nemo_avllm.data.collate import collate_av
    from nemo_avllm.data.packing import collate_packed, make_spec
    from nemo_avllm.model.provider import avllm_config, build_model
    from nemo_avllm.runtime import distributed
    from nemo_avllm.training import optim
    from nemo_avllm.training.step import forward_step

    seq, gbs, mbs = args.cpu_seq, args.cpu_gbs, args.cpu_mbs
    cfg = config.load("stage2_finetune", ["model=tiny", "model.build_encoders=false", "model.allow_random_init=true",
                                          f"model.seq_length={seq}", f"model.micro_batch_size={mbs}",
                                          f"model.global_batch_size={gbs}", "model.activations_checkpoint=false"]).model
    layout = avllm_config(cfg).layout()
    lengths = stage_lengths(2, layout, seq, Path(args.annotations))
    steps = draw_steps(lengths, dict(cfg.data.mat_ratios), gbs, 1, args.cpu_steps + 1, args.seed)
    distributed.initialize(1, 1, seed=1234)
    torch.manual_seed(0)
    model = build_model(cfg)
    ddp, opt = optim.setup_training(model, cfg, use_distributed_optimizer=False, gpu=False)
    g = torch.Generator().manual_seed(0)
    dv, da = model.cfg.vision.geometry()["width"], model.cfg.audio.width
    data = [synthetic_items(layout, s[0], i, dv, da, seq, g) for i, s in enumerate(steps)]
    fb = get_forward_backward_func()
    lines, rate = [], {}
    for packing in ("off", "on"):
        if packing == "on":
            spec = make_spec(seq, mbs, False, False)
            batches = [collate_packed(its, spec, collate_av) for its in data]
        else:
            batches = [[collate_av(its[i:i + mbs], seq) for i in range(0, len(its), mbs)] for its in data]
        times, real = [], 0
        for k, mb in enumerate(batches):
            t0 = time.perf_counter()
            ddp.zero_grad_buffer()
            opt.zero_grad()
            fb(forward_step_func=forward_step, data_iterator=iter(mb), model=[ddp], num_microbatches=len(mb),
               seq_length=seq, micro_batch_size=mbs, forward_only=False)
            opt.step()
            if k:  # the first step warms up
                times.append(time.perf_counter() - t0)
                real += sum(len(it["tokens"].input_ids) for it in data[k])
        total = sum(times)
        rate[packing] = len(times) / total
        computed = sum(int(b["pack_shape"].prod()) if "pack_shape" in b else b["input_ids"].numel()
                       for mb in batches[1:] for b in mb)
        lines.append(f"cpu_train model=tiny stage=2 packing={packing} seq={seq} gbs={gbs} mbs={mbs} "
                     f"steps_per_s={rate[packing]:.3f} useful_tokens_per_s={real / total:.0f} "
                     f"useful_fraction={real / computed:.3f} steps={len(times)}"
                     + (f" speedup={rate['on'] / rate['off']:.2f}" if packing == "on" else ""))
    distributed.destroy()
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotations", default=str(ANNOTATIONS))
    ap.add_argument("--steps", type=int, default=50, help="global batches drawn per stage")
    ap.add_argument("--dp", type=int, default=8, help="data-parallel size (the stage configs' trainer.devices)")
    ap.add_argument("--layout", choices=["thd", "local"], default="thd",
                    help="thd: Transformer Engine (GPU); local: rows with a block mask (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cpu", action="store_true", help="skip the tiny model's CPU training")
    ap.add_argument("--cpu-steps", type=int, default=4)
    ap.add_argument("--cpu-seq", type=int, default=1024)
    ap.add_argument("--cpu-gbs", type=int, default=16)
    ap.add_argument("--cpu-mbs", type=int, default=4)
    ap.add_argument("--out", default=None, help="append the lines to this file")
    args = ap.parse_args(argv)
    lines = measure_fractions(args)
    for line in lines:
        print(line, flush=True)
    if not args.no_cpu:
        more = cpu_training(args)
        for line in more:
            print(line, flush=True)
        lines += more
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
