"""Training manifest: JSON Lines, one sample per line, validated before any GPU time is spent.

A line::

    {"id": "vid1", "video": "clips/vid1.mp4", "audio": "clips/vid1.wav",      # audio optional
     "conversations": [{"from": "human", "value": "<AUD_VIS> What happens?"},
                       {"from": "gpt", "value": "A dog barks at a red ball."}],
     "views": {"V": [...], "A": [...]}}                                          # optional

Paths are relative to the manifest's folder or absolute; `video` may be a still image. Modality
tokens (`<VIS>`, `<AUD>`, `<AUD_VIS>`) go in human turns. `views` holds conversations written for
other modalities of the same clip (e.g. the visual-only and audio-only instructions curated from
an audio-visual video, paper Table 1); with `data.derive_views` MAT trains them as extra V / A / AV
items. It is the only way a sample yields another modality: rewriting the token alone would keep
an answer written for what the other modality shows or sounds like.

`manifest_checks.validate_manifest` checks every line into `Sample`s and a report of the
problems (the codes below). `read_inputs` reads only the media
of a manifest (what `prepare` and `features` work on, keyed by `stable_id`) and leaves out, with
the same FILE:LINE report, a line it cannot use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from nemo_avllm import modality
from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)

# Modality classes of a sample (or of one view of it).
V, A, AV = "V", "A", "AV"
MODALITIES = (V, A, AV)

# Problem codes (keys of ValidationReport.counts).
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
MISSING_MEDIA = "missing_media"
BAD_MEDIA = "bad_media"
UNKNOWN_TOKEN = "unknown_token"
NO_MODALITY_TOKEN = "no_modality_token"
NO_AUDIO = "no_audio"
EMPTY_CONVERSATION = "empty_conversation"
BAD_TURNS = "bad_turns"
TOO_LONG = "too_long"
BAD_VIEW = "bad_view"

# --------------------------------------------------------------------------------------------
# Problems and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestProblem:
    code: str
    file: str
    line: int
    field: str
    message: str
    fix: str

    @property
    def what(self) -> str:
        """What is wrong and the fix, without the place."""
        return f"field '{self.field}': {self.message}. Fix: {self.fix}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


class ManifestError(UserError):
    """Raised by `validate_manifest(strict=True)`; `.problem` says what and where."""

    def __init__(self, problem: ManifestProblem):
        self.problem = problem
        super().__init__(str(problem))


@dataclass
class ValidationReport:
    """What validation found: sample counts, problem counts, the first examples of each."""

    files: list[str] = field(default_factory=list)
    lines: int = 0  # non-blank, non-comment lines
    kept: int = 0
    dropped: int = 0  # samples left out (every problem but a bad view drops its sample)
    truncated: int = 0  # kept, last response cut to max_length (policy "truncate")
    counts: Counter = field(default_factory=Counter)  # problem code -> occurrences
    examples: dict[str, list[str]] = field(default_factory=dict)  # code -> first messages
    modalities: Counter = field(default_factory=Counter)  # kept samples per modality class
    max_examples: int = 3

    def add(self, problem: ManifestProblem) -> None:
        self.counts[problem.code] += 1
        ex = self.examples.setdefault(problem.code, [])
        if len(ex) < self.max_examples:
            ex.append(str(problem))

    @property
    def ok(self) -> bool:
        return not self.counts

    def __str__(self) -> str:
        head = (f"manifest {', '.join(self.files)}: {self.lines} lines, {self.kept} samples kept "
                f"({', '.join(f'{m}={self.modalities[m]}' for m in MODALITIES)}), {self.dropped} dropped, "
                f"{self.truncated} truncated")
        lines = [head]
        for code, n in self.counts.most_common():
            lines.append(f"  {code}: {n}")
            lines.extend(f"    {m}" for m in self.examples.get(code, []))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One validated manifest line. `media_id` keys the prepare index and the feature cache."""

    id: str
    video: str  # absolute path
    audio: str | None  # absolute path of a separate audio file
    conversations: list[dict]
    modality: str  # V | A | AV
    has_audio: bool | None  # None: not probed (visual-only sample without an index)
    media_id: str
    file: str = ""
    line: int = 0
    views: dict[str, list[dict]] | None = None
    num_tokens: int | None = None  # after modality expansion, when a tokenizer was given
    record: dict = field(default_factory=dict)  # the manifest line as read (for shards)

    def to_json(self) -> dict:
        """Plain-JSON form (what a webdataset shard stores next to the media)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def available_views(self, derive: bool) -> list[str]:
        """Views this sample can be trained as: its own modality class, plus with `derive` the
        modalities of its validated `views`. Nothing is derived by rewriting modality tokens: an
        answer written for the audio-visual clip would teach a `<VIS>` sample to describe sounds."""
        out = {self.modality, *((self.views or {}) if derive else ())}
        return [m for m in MODALITIES if m in out]

    def conversation(self, view: str | None = None) -> list[dict]:
        """The turns for `view`: the sample's own, or its `views[view]`."""
        if view is None or view == self.modality:
            return self.conversations
        if self.views and view in self.views:
            return self.views[view]
        raise KeyError(f"sample {self.id} ({self.file}:{self.line}) has no {view!r} conversation; give one in "
                       f"the manifest's 'views' field")


def modality_class(turns: Iterable[dict]) -> str | None:
    """V (only <VIS>), A (only <AUD>), AV (any <AUD_VIS>, or both); None without any token."""
    found = {tok for t in turns for tok in modality.tokens_in(str(t.get("value", "")))}
    if not found:
        return None
    if modality.AUD_VIS_TOKEN in found or {modality.VIS_TOKEN, modality.AUD_TOKEN} <= found:
        return AV
    return V if modality.VIS_TOKEN in found else A


def needs_audio(mod: str) -> bool:
    return mod in (A, AV)


# --------------------------------------------------------------------------------------------
# Media of a manifest
# --------------------------------------------------------------------------------------------


def stable_id(video: str, audio: str | None = None) -> str:
    """The media id: readable and collision-free, `<stem>-<sha1(abs paths)[:12]>`, the same on
    every run; it keys the prepare index, samples and the feature cache."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(video).stem)[:48] or "video"
    key = video if audio is None else f"{video}\n{audio}"
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def resolve_media_path(p, base: Path) -> str:
    """A manifest path -> absolute, resolved path; media ids (`stable_id`) are computed on it,
    so the prepare index, manifests and the feature cache agree on them."""
    path = Path(os.path.expanduser(str(p)))
    return str((path if path.is_absolute() else base / path).resolve())


_FIELD_HELP = {
    "id": "a unique string",
    "video": "a path to a video or image, relative to the manifest's folder or absolute",
    "conversations": 'a list of {"from": "human"|"gpt", "value": text} turns',
}


class LineDropped(Exception):
    """A problem that removes the sample (carried to the report by the line loop)."""

    def __init__(self, problem: ManifestProblem):
        self.problem = problem


def iter_lines(path: Path):
    """(line number, text) of the non-blank, non-comment lines of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            text = text.strip()
            if text and not text.startswith("#"):
                yield lineno, text


_FIELD_KINDS = {"id": (str, int), "video": str, "conversations": list}


def parse_line(text: str, file: str, line: int, required: tuple[str, ...] = ("id", "video", "conversations")) -> dict:
    """One manifest line -> its JSON object with the `required` fields (and a valid `audio`, if
    any); raises `LineDropped` with what is wrong and the fix otherwise."""

    def drop(code, fld, message, fix):
        return LineDropped(ManifestProblem(code, file, line, fld, message, fix))

    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise drop(INVALID_JSON, "<line>", f"not valid JSON ({e.msg} at column {e.colno})",
                   "write one JSON object per line (JSON Lines); check quotes, commas and brackets") from None
    if not isinstance(rec, dict):
        raise drop(INVALID_JSON, "<line>", f"a JSON {type(rec).__name__}, not an object",
                   'write one object per line: {"id": ..., "video": ..., "conversations": [...]}')
    for name in required:
        if name not in rec:
            raise drop(MISSING_FIELD, name, f"required field '{name}' is missing", f"add '{name}' ({_FIELD_HELP[name]})")
    for name in required:
        kind = _FIELD_KINDS[name]
        if not isinstance(rec[name], kind) or (kind is str and not rec[name].strip()):
            raise drop(INVALID_FIELD, name, f"'{name}' is {type(rec[name]).__name__} {rec[name]!r:.60}",
                       f"give '{name}' as {_FIELD_HELP[name]}")
    if rec.get("audio") is not None and not (isinstance(rec["audio"], str) and rec["audio"].strip()):
        raise drop(INVALID_FIELD, "audio", f"'audio' is {rec['audio']!r:.60}",
                   "give 'audio' as a path to an audio file, or leave the field out")
    return rec


@dataclass(frozen=True)
class MediaItem:
    """The media of one manifest line: what `prepare` and `features` work on."""

    video: str  # absolute path
    audio: str | None  # absolute path of a separate audio file, if the manifest gives one
    id: str  # stable_id(video, audio)


MANIFEST_SUFFIXES = (".jsonl", ".json", ".txt")


def read_inputs(source, problems: list[ManifestProblem] | None = None) -> list[MediaItem]:
    """The distinct media of: a manifest (JSON Lines with `video` and optional `audio`, paths
    relative to its folder or absolute; a line may also be a bare path), a list of manifests
    (.jsonl/.json/.txt), or a list of video paths. Only the media are read (no conversation
    checks), so evaluation manifests work too. A line that cannot be used (invalid JSON, no
    `video`, ...) is left out and reported: appended to `problems` when given, else logged."""
    if not isinstance(source, (str, os.PathLike)) and source and all(
        Path(str(p)).suffix in MANIFEST_SUFFIXES for p in source
    ):
        merged: dict[str, MediaItem] = {}
        for m in source:
            for it in read_inputs(m, problems):
                merged.setdefault(it.id, it)
        return list(merged.values())
    rows: list[tuple[str, str | None]] = []
    if isinstance(source, (str, os.PathLike)):
        manifest = Path(source)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest} not found")
        base = manifest.resolve().parent
        for lineno, line in iter_lines(manifest):
            if not line.startswith("{"):
                rows.append((resolve_media_path(line, base), None))
                continue
            try:
                rec = parse_line(line, str(manifest), lineno, required=("video",))
            except LineDropped as d:
                if problems is None:
                    log.warning("%s; line left out", d.problem)
                else:
                    problems.append(d.problem)
                continue
            audio = rec.get("audio")
            rows.append((resolve_media_path(rec["video"], base), resolve_media_path(audio, base) if audio else None))
    else:
        cwd = Path.cwd()
        rows = [(resolve_media_path(p, cwd), None) for p in source]
    items = {}
    for video, audio in rows:
        items.setdefault((video, audio), MediaItem(video, audio, stable_id(video, audio)))
    return list(items.values())
