"""The demo's synthetic audio-visual dataset, made with ffmpeg (real H.264 + AAC files).

Each clip: a coloured shape that moves across a dark frame, and (mostly) a tone. What a clip
shows and sounds like is drawn from a seed, so questions have exact answers:

| family | question is about | answers | modality token(s) |
|---|---|---|---|
| colour | the shape's colour | red / green / blue / yellow | <VIS>, <AUD_VIS> |
| shape | the shape | circle / square / triangle | <VIS>, <AUD_VIS> |
| motion | where it moves | left / right / up / down | <VIS>, <AUD_VIS> |
| pitch | the tone | high / low | <AUD>, <AUD_VIS> |
| loudness | the tone | loud / quiet | <AUD>, <AUD_VIS> |
| sync | do the sound and the shape start together | yes / no | <AUD_VIS> |

The shape appears at the start or half-way through; the tone starts at the start or half-way,
so "sync" needs both modalities. About one clip in six has no audio track (visual questions
only). Stage 1 gets descriptions; stage 2 multi-turn conversations mixing the three tokens plus
one "reasoning" question (sync) per clip with audio, as the paper's stage 2 mixes conversations
and complex reasoning.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from nemo_avllm.data.ffmpeg import encode

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 220.0, "high": 1760.0}
LOUDNESS = {"quiet": 0.03, "loud": 0.6}

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "motion": "Which way does the shape move?",
    "pitch": "Is the tone high or low?",
    "loudness": "Is the sound loud or quiet?",
    "sync": "Do the sound and the shape start together?",
}
# Accuracy of guessing, per family and per part of the reasoning answer (two-way observations).
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "motion": 1 / len(MOTIONS),
          "pitch": 1 / len(PITCHES), "loudness": 1 / len(LOUDNESS), "sync": 0.5,
          "shape timing": 0.5, "sound timing": 0.5, "verdict": 0.5}
VISUAL_FAMILIES = ("colour", "shape", "motion")
AUDIO_FAMILIES = ("pitch", "loudness")
FAMILIES = tuple(QUESTIONS)


@dataclass
class ClipSpec:
    id: str
    colour: str
    shape: str
    motion: str
    has_audio: bool
    pitch: str
    loudness: str
    shape_late: bool  # the shape appears half-way through
    sound_late: bool  # the tone starts half-way through

    def answer(self, family: str) -> str:
        """The word that answers `family` (what evaluation scores)."""
        if family == "sync":
            return "yes" if self.shape_late == self.sound_late else "no"
        return getattr(self, family)

    def parts(self, family: str) -> dict[str, str]:
        """The parts of a reasoning answer, each scored on its own: the two observations and the
        verdict (empty for one-word families)."""
        if family != "sync":
            return {}
        when = lambda late: "half-way" if late else "at the start"  # noqa: E731
        return {"shape timing": f"shape appears {when(self.shape_late)}",
                "sound timing": f"sound starts {when(self.sound_late)}",
                "verdict": f"so {self.answer('sync')}"}

    def response(self, family: str) -> str:
        """The training response. Sync is the reasoning family: the response states both
        observations before the verdict, so the verdict follows from the model's own words."""
        if family != "sync":
            return self.answer(family)
        p = self.parts(family)
        return f"The {p['shape timing']} and the {p['sound timing']}, {p['verdict']}."


def draw_spec(i: int, rng: random.Random, p_no_audio: float = 1 / 6) -> ClipSpec:
    return ClipSpec(
        id=f"clip{i:05d}",
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        motion=rng.choice(MOTIONS),
        has_audio=rng.random() >= p_no_audio,
        pitch=rng.choice(list(PITCHES)),
        loudness=rng.choice(list(LOUDNESS)),
        shape_late=rng.random() < 0.5,
        sound_late=rng.random() < 0.5,
    )


def render_frames(spec: ClipSpec, size: int, num_frames: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: the shape crossing the frame in its direction."""
    # No per-clip pixel noise on purpose: clips that look alike give the same visual tokens, so
    # the model cannot memorise audio answers from a visual fingerprint and must listen.
    frames = np.full((num_frames, size, size, 3), 24, dtype=np.uint8)
    r = size // 5
    yy, xx = np.mgrid[0:size, 0:size]
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    for f in range(num_frames):
        if spec.shape_late and f < num_frames // 2:
            continue
        a = f / max(1, num_frames - 1)
        lo, hi = r + 2, size - r - 2
        pos = lo + (hi - lo) * a
        cx, cy = {
            "right": (pos, size / 2),
            "left": (lo + hi - pos, size / 2),
            "down": (size / 2, pos),
            "up": (size / 2, lo + hi - pos),
        }[spec.motion]
        dx, dy = xx - cx, yy - cy
        if spec.shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif spec.shape == "square":
            mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
        else:  # upward triangle
            mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
        frames[f][mask] = colour
    return frames


def render_audio(spec: ClipSpec, seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = LOUDNESS[spec.loudness] * np.sin(2 * np.pi * PITCHES[spec.pitch] * t)
    if spec.sound_late:
        wave[: len(t) // 2] = 0.0
    wave += 0.002 * rng.standard_normal(len(t))  # room noise
    return wave.astype(np.float32)


def _make_clip(job) -> dict:
    spec, out_dir, size, fps, seconds, rate, seed = job
    path = Path(out_dir) / "videos" / f"{spec.id}.mp4"
    n = int(round(fps * seconds))
    audio = render_audio(spec, seconds, rate, seed) if spec.has_audio else None
    encode(path, render_frames(spec, size, n), fps, audio=audio, audio_rate=rate)
    return {"id": spec.id, "video": str(path.relative_to(out_dir)), "spec": asdict(spec)}


def tokens_for(family: str, spec: ClipSpec, rng: random.Random) -> str:
    """A modality token that can answer `family` for this clip (MAT: all three get used)."""
    if family == "sync":
        return "<AUD_VIS>"
    if family in AUDIO_FAMILIES:
        return rng.choice(["<AUD>", "<AUD_VIS>"])
    if spec.has_audio:
        return rng.choice(["<VIS>", "<VIS>", "<AUD_VIS>"])
    return "<VIS>"


def families_for(spec: ClipSpec) -> tuple[str, ...]:
    return FAMILIES if spec.has_audio else VISUAL_FAMILIES


def description(spec: ClipSpec, token: str) -> str:
    vis = f"A {spec.colour} {spec.shape} moves {spec.motion}."
    aud = f"A {spec.loudness} {spec.pitch} tone plays."
    if token == "<VIS>":
        return vis
    if token == "<AUD>":
        return aud
    return f"{vis} {aud} They start {'together' if spec.answer('sync') == 'yes' else 'apart'}."


def stage1_sample(entry: dict, rng: random.Random) -> dict:
    spec = ClipSpec(**entry["spec"])
    token = rng.choice(["<VIS>", "<AUD>", "<AUD_VIS>"]) if spec.has_audio else "<VIS>"
    ask = {"<VIS>": "Describe what you see.", "<AUD>": "Describe what you hear.",
           "<AUD_VIS>": "Describe what you see and hear."}[token]
    return {"id": entry["id"], "video": entry["video"],
            "conversations": [{"from": "human", "value": f"{token} {ask}"},
                              {"from": "gpt", "value": description(spec, token)}]}


def stage2_sample(entry: dict, rng: random.Random, turns: int = 3) -> dict:
    spec = ClipSpec(**entry["spec"])
    fams = list(families_for(spec))
    rng.shuffle(fams)
    conv = []
    for fam in fams[:turns]:
        tok = tokens_for(fam, spec, rng)
        conv += [{"from": "human", "value": f"{tok} {QUESTIONS[fam]}"}, {"from": "gpt", "value": spec.response(fam)}]
    return {"id": entry["id"], "video": entry["video"], "conversations": conv}


def reasoning_sample(entry: dict) -> dict | None:
    """Stage 2's complex-reasoning part: the question that needs both modalities (sync)."""
    spec = ClipSpec(**entry["spec"])
    if not spec.has_audio:
        return None
    return {"id": f"{entry['id']}-sync", "video": entry["video"],
            "conversations": [{"from": "human", "value": f"<AUD_VIS> {QUESTIONS['sync']}"},
                              {"from": "gpt", "value": spec.response("sync")}]}


def eval_items(entry: dict) -> list[dict]:
    """Every (family, token) question for a held-out clip, including the Fig. 5 control:
    audio questions asked with <VIS> only (the model cannot hear, so ~chance)."""
    spec = ClipSpec(**entry["spec"])
    items = []
    for fam in families_for(spec):
        toks = ["<AUD_VIS>"] if fam == "sync" else (
            ["<AUD>", "<AUD_VIS>", "<VIS>"] if fam in AUDIO_FAMILIES else (["<VIS>", "<AUD_VIS>"] if spec.has_audio else ["<VIS>"]))
        for tok in toks:
            items.append({"id": entry["id"], "video": entry["video"], "family": fam, "token": tok,
                          "answer": spec.answer(fam), "reasoning": fam == "sync", "parts": spec.parts(fam),
                          "conversations": [{"from": "human", "value": f"{tok} {QUESTIONS[fam]}"}]})
    return items


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def generate(out_dir: str | Path, num_train: int, num_eval: int, seed: int = 0, size: int = 96, fps: float = 8.0,
             seconds: float = 2.0, rate: int = 16000, workers: int = 2) -> dict[str, Path]:
    """Clips + manifests: stage1.jsonl, stage2.jsonl (train clips), eval.jsonl (held-out clips)."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = [draw_spec(i, rng) for i in range(num_train + num_eval)]
    jobs = [(s, str(out_dir), size, fps, seconds, rate, seed * 100003 + i) for i, s in enumerate(specs)]
    todo = [j for j in jobs if not (out_dir / "videos" / f"{j[0].id}.mp4").exists()]
    if todo:
        with Pool(max(1, workers)) as pool:
            pool.map(_make_clip, todo, chunksize=8)
    entries = [{"id": s.id, "video": f"videos/{s.id}.mp4", "spec": asdict(s)} for s in specs]
    train, held = entries[:num_train], entries[num_train:]
    r1, r2 = random.Random(seed + 1), random.Random(seed + 2)
    return {
        "stage1": write_jsonl(out_dir / "stage1.jsonl", [stage1_sample(e, r1) for e in train]),
        "stage2": write_jsonl(out_dir / "stage2.jsonl", [stage2_sample(e, r2) for e in train]
                              + [r for e in train if (r := reasoning_sample(e)) is not None]),
        "eval": write_jsonl(out_dir / "eval.jsonl", [it for e in held for it in eval_items(e)]),
        "clips": write_jsonl(out_dir / "clips.jsonl", entries),
    }


def corpus(paths: dict[str, Path]) -> list[str]:
    """All texts of the manifests (tokenizer training)."""
    from nemo_avllm.data.conversation import SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT + " Human: Assistant:"]
    for key in ("stage1", "stage2", "eval"):
        for line in Path(paths[key]).read_text().splitlines():
            for turn in json.loads(line)["conversations"]:
                texts.append(turn["value"])
    return texts
