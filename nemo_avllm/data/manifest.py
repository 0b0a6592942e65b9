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

`validate_manifest` never crashes on bad data: it returns the good samples and a report that
counts every problem (with the first examples, each naming file, line, field and the fix), so a
run over a million lines tells the user everything that is wrong at once. `strict=True` raises on
the first problem instead (CI, small hand-written manifests). `read_inputs` reads only the media
of a manifest (what `prepare` and `features` work on, keyed by `stable_id`) and leaves out, with
the same FILE:LINE report, a line it cannot use.
"""

from __future__ import annotations

import difflib
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
from nemo_avllm.data.conversation import ConversationError, ConversationTemplate, check_turns, tokenize_conversation
from nemo_avllm.data.decode_pyav import probe_audio
from nemo_avllm.data.index import MediaIndex, as_index
from nemo_avllm.data.media import MediaError
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

POLICIES = ("truncate", "drop")

# Anything shaped like a modality token: `<UPPER_CASE>`, plus lower-case spellings of the usual
# suspects from other projects (LLaVA's `<image>`, `<video>`, ...).
_TOKEN_LIKE = re.compile(r"<[A-Za-z][A-Za-z0-9_]*>")
_ALIASES = {
    "<IMG>": modality.VIS_TOKEN, "<IMAGE>": modality.VIS_TOKEN, "<VIDEO>": modality.VIS_TOKEN,
    "<VISUAL>": modality.VIS_TOKEN, "<VISION>": modality.VIS_TOKEN, "<AUDIO>": modality.AUD_TOKEN,
    "<SOUND>": modality.AUD_TOKEN, "<AV>": modality.AUD_VIS_TOKEN, "<AUDIO_VIDEO>": modality.AUD_VIS_TOKEN,
    "<AUDIO_VISUAL>": modality.AUD_VIS_TOKEN, "<VIS_AUD>": modality.AUD_VIS_TOKEN,
}
_TOKENS_HELP = "use <VIS> (visual), <AUD> (audio) or <AUD_VIS> (audio-visual)"


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


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class _Drop(Exception):
    """A problem that removes the sample (carried to the report by the line loop)."""

    def __init__(self, problem: ManifestProblem):
        self.problem = problem


def _unknown_tokens(text: str) -> list[str]:
    out = []
    for tok in _TOKEN_LIKE.findall(text):
        if tok in modality.MODALITY_TOKENS:
            continue
        up = tok.upper()
        if tok == up or up in _ALIASES or up in modality.MODALITY_TOKENS:
            out.append(tok)
    return out


def _token_fix(tok: str) -> str:
    up = tok.upper()
    guess = _ALIASES.get(up) or (up if up in modality.MODALITY_TOKENS else None)
    if guess is None:
        close = difflib.get_close_matches(up, modality.MODALITY_TOKENS, n=1, cutoff=0.6)
        guess = close[0] if close else None
    return (f"replace {tok} by {guess}; " if guess else "") + _TOKENS_HELP


class _Validator:
    def __init__(self, *, base: Path, file: str, index: MediaIndex | None, tokenizer, layout, max_length,
                 policy: str, template: ConversationTemplate, check_files: bool):
        self.base, self.file, self.index = base, file, index
        self.tokenizer, self.layout, self.max_length = tokenizer, layout, max_length
        self.policy, self.template, self.check_files = policy, template, check_files
        self.truncated = False
        self.view_problems: list[ManifestProblem] = []

    def problem(self, code, line, fld, message, fix) -> ManifestProblem:
        return ManifestProblem(code, self.file, line, fld, message, fix)

    def drop(self, *args) -> _Drop:
        return _Drop(self.problem(*args))

    # -- the line ----------------------------------------------------------------------------
    def sample(self, text: str, line: int) -> Sample:
        rec = _parse_line(text, self.file, line)
        video = resolve_media_path(rec["video"], self.base)
        audio = resolve_media_path(rec["audio"], self.base) if rec.get("audio") else None
        turns = rec["conversations"]
        mod = self.conversation(turns, line, "conversations")
        mid = stable_id(video, audio)
        if self.check_files:
            for name, path in (("video", video), ("audio", audio)):
                if path is not None and not os.access(path, os.R_OK):
                    what = "does not exist" if not os.path.exists(path) else "is not readable"
                    raise self.drop(MISSING_MEDIA, line, name, f"{name} file {path} {what}",
                                    f"fix the path (relative paths start at {self.base}) or remove the sample")
        has_audio = self.has_audio(video, audio, mid, line, probe=needs_audio(mod) or bool(rec.get("views")))
        if needs_audio(mod) and not has_audio:
            src = audio or video
            raise self.drop(NO_AUDIO, line, "conversations",
                            f"the conversation uses {modality.AUD_TOKEN} or {modality.AUD_VIS_TOKEN} but {src} has no audio",
                            f"use {modality.VIS_TOKEN} for this video, give an 'audio' file, or drop the sample")
        ntok = self.length(turns, line, "conversations")
        views = self.views(rec.get("views"), line, has_audio, mod)
        return Sample(id=str(rec["id"]), video=video, audio=audio, conversations=turns, modality=mod,
                      has_audio=has_audio, media_id=mid, file=self.file, line=line, views=views,
                      num_tokens=ntok, record=rec)

    # -- parts -------------------------------------------------------------------------------
    def conversation(self, turns, line: int, fld: str) -> str:
        """Checks of one conversation that need no media; returns its modality class."""
        for i, turn in enumerate(turns):
            if isinstance(turn, dict):
                bad = _unknown_tokens(str(turn.get("value", "")))
                if bad:
                    raise self.drop(UNKNOWN_TOKEN, line, f"{fld}[{i}].value", f"unknown modality token {bad[0]}",
                                    _token_fix(bad[0]))
        try:
            check_turns(turns, where=fld)
        except ConversationError as e:
            if not turns:
                raise self.drop(EMPTY_CONVERSATION, line, fld, "the conversation is empty",
                                "give at least one human turn (with a modality token) and one gpt turn")
            where, _, what = str(e).partition(": ")
            what, _, fix = what.partition("; ")
            if not fix:
                fix = ("move the modality token into the human turn before this response" if "modality" in what
                       else 'write each turn as {"from": "human"|"gpt", "value": text}')
            raise self.drop(BAD_TURNS, line, where, what, fix)
        if turns[-1]["from"] != "gpt":
            raise self.drop(BAD_TURNS, line, f"{fld}[{len(turns) - 1}]",
                            "the conversation ends with a human turn, which has no response to learn",
                            "end with a gpt turn or remove the last question")
        mod = modality_class(turns)
        if mod is None:
            raise self.drop(NO_MODALITY_TOKEN, line, fld, "no modality token in any human turn",
                            f"{_TOKENS_HELP}; put it in the first human turn")
        return mod

    def has_audio(self, video: str, audio: str | None, mid: str, line: int, probe: bool) -> bool | None:
        """From the prepare index when given (what training will read), else probed with PyAV."""
        fld = "audio" if audio else "video"
        if self.index is not None:
            rec = self.index.get(mid)
            if rec is None:
                reason = self.index.bad.get(video) or (self.index.bad.get(audio) if audio else None)
                if reason:
                    raise self.drop(BAD_MEDIA, line, fld, f"prepare could not read it: {reason}",
                                    "re-encode or replace the file, then rerun `avllm prepare`; or remove the sample")
                raise self.drop(BAD_MEDIA, line, "video", f"{video} is not in the prepare index {self.index.path}",
                                "rerun `avllm prepare` on this manifest (it indexes new files and resumes)")
            return bool(rec.get("has_audio"))
        if not probe:
            return None
        try:
            return probe_audio(audio or video) is not None
        except MediaError as e:
            raise self.drop(BAD_MEDIA, line, fld, f"cannot read {e.path}: {e.reason}",
                            "re-encode or replace the file, or remove the sample")

    def length(self, turns, line: int, fld: str) -> int | None:
        """Tokens after modality expansion; applies the too-long policy."""
        if self.tokenizer is None or self.layout is None:
            return None
        n = len(tokenize_conversation(turns, self.tokenizer, self.layout, self.template).input_ids)
        if self.max_length is None or n <= self.max_length:
            return n
        if self.policy == "drop":
            raise self.drop(TOO_LONG, line, fld, f"{n} tokens after modality expansion, more than max_length={self.max_length}",
                            "shorten the conversation, raise data.max_length, or set data.max_length_policy=truncate")
        try:
            tokenize_conversation(turns, self.tokenizer, self.layout, self.template, max_length=self.max_length)
        except ConversationError:
            raise self.drop(TOO_LONG, line, fld,
                            f"{n} tokens after modality expansion and the first prompt alone exceeds max_length={self.max_length}",
                            "shorten the first human turn or raise data.max_length")
        self.truncated = True
        return self.max_length

    def views(self, views, line: int, has_audio: bool | None, own: str) -> dict[str, list[dict]] | None:
        """Per-view conversations; a bad view is reported and left out, the sample stays."""
        if views is None:
            return None
        if not isinstance(views, dict):
            raise self.drop(INVALID_FIELD, line, "views", f"'views' is {type(views).__name__}",
                            'give views as {"V": [turns], "A": [turns], "AV": [turns]} or leave it out')
        out = {}
        for name, turns in views.items():
            fld = f"views.{name}"
            try:
                if name not in MODALITIES:
                    raise self.drop(BAD_VIEW, line, fld, f"unknown view {name!r}", f"name views {', '.join(MODALITIES)}")
                if not isinstance(turns, list):
                    raise self.drop(BAD_VIEW, line, fld, f"a view is a list of turns, not {type(turns).__name__}",
                                    "give the view's conversation as a list of {from, value} turns")
                mod = self.conversation(turns, line, fld)
                if name == own:
                    raise self.drop(BAD_VIEW, line, fld, f"view {name} is the modality of the sample's own "
                                    f"conversation", f"remove views.{name} (the 'conversations' field is already "
                                    f"the {name} one)")
                if mod != name:
                    raise self.drop(BAD_VIEW, line, fld, f"view {name} uses the tokens of modality {mod}",
                                    f"use only {'<VIS>' if name == V else '<AUD>' if name == A else '<AUD_VIS>'} in this view")
                if needs_audio(name) and not has_audio:
                    raise self.drop(BAD_VIEW, line, fld, f"view {name} needs audio but the video has none",
                                    "remove this view or give the sample an 'audio' file")
                was_truncated = self.truncated
                self.length(turns, line, fld)
                self.truncated = was_truncated
            except _Drop as d:
                self.view_problems.append(d.problem)
                continue
            out[name] = turns
        return out or None


_FIELD_HELP = {
    "id": "a unique string",
    "video": "a path to a video or image, relative to the manifest's folder or absolute",
    "conversations": 'a list of {"from": "human"|"gpt", "value": text} turns',
}


def iter_lines(path: Path):
    """(line number, text) of the non-blank, non-comment lines of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            text = text.strip()
            if text and not text.startswith("#"):
                yield lineno, text


_FIELD_KINDS = {"id": (str, int), "video": str, "conversations": list}


def _parse_line(text: str, file: str, line: int, required: tuple[str, ...] = ("id", "video", "conversations")) -> dict:
    """One manifest line -> its JSON object with the `required` fields (and a valid `audio`, if
    any); raises `_Drop` with what is wrong and the fix otherwise."""

    def drop(code, fld, message, fix):
        return _Drop(ManifestProblem(code, file, line, fld, message, fix))

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
                rec = _parse_line(line, str(manifest), lineno, required=("video",))
            except _Drop as d:
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


def validate_manifest(
    paths,
    *,
    index=None,
    tokenizer=None,
    layout: modality.TokenLayout | None = None,
    max_length: int | None = None,
    policy: str = "truncate",
    strict: bool = False,
    check_files: bool = True,
    template: ConversationTemplate = ConversationTemplate(),
) -> tuple[list[Sample], ValidationReport]:
    """Read and validate one manifest or a list of them -> (good samples, report).

    `index`: the prepare output (folder or index.jsonl, or a MediaIndex): gives `has_audio`
    without probing and rejects files prepare could not read. `tokenizer` + `layout` +
    `max_length`: check lengths after modality expansion with `policy` "truncate" (keep, cut the
    last response when tokenising) or "drop". `strict`: raise ManifestError on the first problem.
    `check_files=False` skips the existence check (training from a feature cache or shards,
    where the raw media need not be on this machine)."""
    if policy not in POLICIES:
        raise ValueError(f"data.max_length_policy={policy!r}; expected one of {POLICIES}")
    index = as_index(index)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    report = ValidationReport()
    samples: list[Sample] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"manifest {p} not found; set data.train_manifest to a JSON Lines file")
        report.files.append(str(p))
        v = _Validator(base=p.resolve().parent, file=str(p), index=index, tokenizer=tokenizer, layout=layout,
                       max_length=max_length, policy=policy, template=template, check_files=check_files)
        for lineno, text in iter_lines(p):
            report.lines += 1
            v.truncated, v.view_problems = False, []
            try:
                s = v.sample(text, lineno)
            except _Drop as d:
                if strict:
                    raise ManifestError(d.problem) from None
                report.add(d.problem)
                report.dropped += 1
                continue
            for prob in v.view_problems:
                if strict:
                    raise ManifestError(prob)
                report.add(prob)
            samples.append(s)
            report.kept += 1
            report.truncated += int(v.truncated)
            report.modalities[s.modality] += 1
    if report.counts:
        log.warning("%s", report)
    return samples, report
