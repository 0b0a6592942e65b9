"""`avllm generate` and `avllm chat`: ask a trained model about a video, image or audio file.

    avllm generate checkpoint=RUN/checkpoints/X-last input=clip.mp4 question="What is happening?"
    avllm generate hf=EXPORT_DIR input=questions.jsonl out=predictions.jsonl
    avllm chat checkpoint=... input=clip.mp4            # multi-turn; the media are encoded once

The modality token comes from the file (`modality=auto`): `<AUD_VIS>` for a video with an audio
track, `<VIS>` for a silent video or an image, `<AUD>` for an audio file; `modality=<VIS>` etc.
forces one (a token that needs audio on a silent file is refused). A manifest (`.jsonl`) holds one
question per line: `id`, `video` (path relative to the manifest), optional `audio`, and
`question` (or `conversations` ending in a human turn); answers go to `out` as JSON lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_avllm import modality
from nemo_avllm.data.decode import MediaSource, load_media
from nemo_avllm.data.decode_pyav import probe, probe_audio
from nemo_avllm.media import MediaError
from nemo_avllm.inference.engine import SamplingConfig

MODALITY_CHOICES = ("auto", *modality.MODALITY_TOKENS)


def detect_modality(path: str | Path) -> str:
    """`<AUD_VIS>` for a video with sound, `<VIS>` for a silent video or an image, `<AUD>` for audio."""
    try:
        info = probe(path)
    except MediaError as e:
        if "no video stream" in e.reason and probe_audio(path):
            return modality.AUD_TOKEN
        raise
    return modality.AUD_VIS_TOKEN if info.has_audio and not info.is_image else modality.VIS_TOKEN


def choose_modality(path: str | Path, forced: str | None = "auto") -> str:
    if forced in (None, "auto"):
        return detect_modality(path)
    if forced not in modality.MODALITY_TOKENS:
        raise ValueError(f"modality={forced!r}; expected one of {MODALITY_CHOICES}")
    return forced


def question_turn(question: str, token: str) -> dict:
    """The human turn: the question, with the modality token in front unless it names one."""
    if not question or not question.strip():
        raise ValueError("question is empty: give question=\"...\"")
    return {"from": "human", "value": question if modality.tokens_in(question) else f"{token} {question.strip()}"}


def load_inputs(backend, video: str, audio: str | None, turns: list[dict]):
    """(video [1,T,3,S,S] | None, audio [1,K,W] | None) for what the conversation's tokens ask for."""
    toks = [t for turn in turns for t in modality.tokens_in(turn["value"])]
    want_v = any(t in (modality.VIS_TOKEN, modality.AUD_VIS_TOKEN) for t in toks)
    want_a = any(t in (modality.AUD_TOKEN, modality.AUD_VIS_TOKEN) for t in toks)
    v, a = load_media(MediaSource(str(video), str(video), audio or str(video), None), backend.decode, want_v, want_a)
    return (v.unsqueeze(0) if v is not None else None), (a.unsqueeze(0) if a is not None else None)


def sampling_config(cfg) -> SamplingConfig:
    s = cfg.sampling
    return SamplingConfig(int(s.max_new_tokens), float(s.temperature), int(s.top_k or 0), float(s.top_p or 0.0),
                          list(s.stop or []), int(s.get("seed", 1234)))


def _printer(stream):
    def on_text(i, piece):
        stream.write(piece)
        stream.flush()
    return on_text


def _stack(rows):
    if all(r is None for r in rows):
        return None
    ref = next(r for r in rows if r is not None)
    return torch.cat([r if r is not None else torch.zeros_like(ref) for r in rows])


@dataclass
class Question:
    id: str
    video: str
    audio: str | None
    turns: list[dict]
    token: str


def read_manifest(path: Path, forced: str | None) -> list[Question]:
    """Questions of a JSONL file (see module docstring), read with the data layer's line reader
    and path rule (`nemo_avllm.data.manifest`); problems name the line and field."""
    from nemo_avllm.data.manifest import iter_lines, resolve_media_path

    out = []
    for n, line in iter_lines(path):
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if "video" not in rec:
            raise ValueError(f"{where}: field 'video' is missing (the media file, relative to the manifest)")
        video = resolve_media_path(rec["video"], path.parent)
        audio = resolve_media_path(rec["audio"], path.parent) if rec.get("audio") else None
        token = choose_modality(video, forced) if not rec.get("conversations") else ""
        if rec.get("conversations"):
            turns = rec["conversations"]
            if turns[-1].get("from") != "human":
                raise ValueError(f"{where}: field 'conversations' must end with a human turn (the question)")
        elif rec.get("question"):
            turns = [question_turn(rec["question"], token)]
        else:
            raise ValueError(f"{where}: give 'question' (or 'conversations' ending in a human turn)")
        out.append(Question(str(rec.get("id", n)), video, audio, turns, token or "from conversations"))
    return out


def answer_batch(backend, questions: list[Question], sampling: SamplingConfig, on_text=None):
    """Decode the media, encode them once for the batch, generate. Returns Generations."""
    media = [load_inputs(backend, q.video, q.audio, q.turns) for q in questions]
    prompts = [backend.prompt(q.turns) for q in questions]
    feats = backend.features(prompts, _stack([m[0] for m in media]), _stack([m[1] for m in media]))
    return backend.generate(prompts, feats, sampling, on_text)


def generate(cfg) -> int:
    """`avllm generate`: one file and a question, or a manifest of questions."""
    from nemo_avllm.inference.backends import load_backend

    if not cfg.get("input"):
        raise ValueError("give input=<video, image or audio file> (or a .jsonl manifest of questions)")
    path = Path(cfg.input)
    if not path.is_file():
        raise FileNotFoundError(f"input={path} does not exist")
    sampling = sampling_config(cfg)
    backend = load_backend(cfg)
    if not _is_rank_zero():  # TP ranks compute with rank 0; only rank 0 prints and writes
        cfg.stream = False
    if path.suffix == ".jsonl":
        questions = read_manifest(path, cfg.get("modality", "auto"))
        out = Path(cfg.out or path.with_suffix(".predictions.jsonl"))
        out.parent.mkdir(parents=True, exist_ok=True)
        bs = int(cfg.batch_size)
        t0, n_tok = time.perf_counter(), 0
        with (out.open("w") if _is_rank_zero() else open(os.devnull, "w")) as f:
            for s in range(0, len(questions), bs):
                chunk = questions[s: s + bs]
                for q, g in zip(chunk, answer_batch(backend, chunk, sampling)):
                    n_tok += len(g.tokens)
                    f.write(json.dumps({"id": q.id, "video": q.video, "modality": q.token, "question": q.turns[-1]["value"],
                                        "answer": g.text, "finish": g.finish, "new_tokens": len(g.tokens)}) + "\n")
                print(f"[generate] {min(s + bs, len(questions))}/{len(questions)}", file=sys.stderr)
        print(f"[generate] {len(questions)} answers -> {out} ({n_tok} tokens, {time.perf_counter() - t0:.1f} s)")
        return 0
    token = choose_modality(path, cfg.get("modality", "auto"))
    q = Question("0", str(path), cfg.get("audio"), [question_turn(str(cfg.question or ""), token)], token)
    print(f"[generate] {path.name}: {token} ({backend.name}: {backend.source})", file=sys.stderr)
    g = answer_batch(backend, [q], sampling, _printer(sys.stdout) if cfg.stream else None)[0]
    if _is_rank_zero():
        print("" if cfg.stream else g.text)
    return 0


def _is_rank_zero() -> bool:
    from nemo_avllm.runtime.distributed import is_rank_zero

    return is_rank_zero()


def chat(cfg, stdin=None, stdout=None) -> int:
    """`avllm chat`: read questions from stdin, answer each with the whole conversation so far.
    The media are decoded and encoded once; `/reset` starts over, `/quit` (or EOF) ends."""
    from nemo_avllm.inference.backends import load_backend

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotImplementedError("avllm chat runs in one process (it reads the terminal); for a model that needs "
                                  "TP, export it (`avllm export-hf`) and chat with hf=<folder>")
    path = Path(cfg.input or "")
    if not path.is_file():
        raise FileNotFoundError(f"input={path} does not exist: give input=<video, image or audio file>")
    sampling = sampling_config(cfg)
    backend = load_backend(cfg)
    token = choose_modality(path, cfg.get("modality", "auto"))
    first = question_turn("?", token)
    video, audio = load_inputs(backend, str(path), cfg.get("audio"), [first])
    feats = backend.features([backend.prompt([first])], video, audio)  # once for the whole chat
    stdout.write(f"[chat] {path.name} as {token}; /reset starts over, /quit ends\n")
    turns: list[dict] = []
    while True:
        stdout.write("Human: ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            break
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            turns = []
            continue
        turns.append(question_turn(line, token) if not turns else {"from": "human", "value": line})
        stdout.write("Assistant: ")
        g = backend.generate([backend.prompt(turns)], feats, sampling, _printer(stdout) if cfg.stream else None)[0]
        stdout.write(("" if cfg.stream else g.text) + "\n")
        stdout.flush()
        turns.append({"from": "gpt", "value": g.text})
    return 0
