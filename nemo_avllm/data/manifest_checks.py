"""Validation of a training manifest: every line checked before any GPU time is spent.

`validate_manifest` never crashes on bad data: it returns the good samples and a report that
counts every problem (with the first examples, each naming file, line, field and the fix), so a
run over a million lines tells the user everything that is wrong at once. `strict=True` raises on
the first problem instead (CI, small hand-written manifests). What a line holds, `Sample` and the
problem codes are in `manifest.py`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path

from nemo_avllm import modality
from nemo_avllm.data.conversation import ConversationError, ConversationTemplate, check_turns, tokenize_conversation
from nemo_avllm.data.decode_pyav import probe_audio
from nemo_avllm.data.index import MediaIndex, as_index
from nemo_avllm.data.manifest import (
    BAD_MEDIA,
    BAD_TURNS,
    BAD_VIEW,
    EMPTY_CONVERSATION,
    INVALID_FIELD,
    MISSING_MEDIA,
    MODALITIES,
    NO_AUDIO,
    NO_MODALITY_TOKEN,
    TOO_LONG,
    UNKNOWN_TOKEN,
    A,
    V,
    LineDropped,
    ManifestError,
    ManifestProblem,
    Sample,
    ValidationReport,
    iter_lines,
    modality_class,
    needs_audio,
    parse_line,
    resolve_media_path,
    stable_id,
)
from nemo_avllm.media import MediaError

log = logging.getLogger(__name__)

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

    def drop(self, *args) -> LineDropped:
        return LineDropped(self.problem(*args))

    # -- the line ----------------------------------------------------------------------------
    def sample(self, text: str, line: int) -> Sample:
        rec = parse_line(text, self.file, line)
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
            except LineDropped as d:
                self.view_problems.append(d.problem)
                continue
            out[name] = turns
        return out or None


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
            except LineDropped as d:
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
