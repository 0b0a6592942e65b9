"""Versioned prompt files: `conf/curation/prompts/<version>/{fusion,instructions,judge}.yaml`.

A prompt set is plain YAML with `{placeholders}` (str.format, so literal braces are doubled).
Its `version` goes into every cache key, so editing prompts under a new version folder never
reuses replies made with the old ones. Rendering returns chat messages (system + user).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from nemo_avllm.config import conf_dir

TYPES = ("description", "conversation", "reasoning")
MODALITIES = ("V", "A", "AV")
FILES = ("fusion", "instructions", "judge")


@dataclass
class PromptSet:
    version: str
    fusion: dict
    instructions: dict
    judge: dict
    path: str

    @classmethod
    def load(cls, root, version: str) -> "PromptSet":
        base = Path(root) if root else conf_dir() / "curation" / "prompts"
        folder = base / str(version)
        if not folder.is_dir():
            have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            raise FileNotFoundError(f"prompts.version={version!r}: no folder {folder} (versions there: {have or 'none'})")
        parts = {}
        for name in FILES:
            f = folder / f"{name}.yaml"
            if not f.is_file():
                raise FileNotFoundError(f"prompt set {folder} lacks {f.name}")
            parts[name] = yaml.safe_load(f.read_text())
            if str(parts[name].get("version")) != str(version):
                raise ValueError(f"{f}: version {parts[name].get('version')!r} differs from its folder {version!r}; "
                                 "keep them equal (cached replies are keyed by the version)")
        ins = parts["instructions"]
        for t in TYPES:
            if t not in ins["types"]:
                raise ValueError(f"{folder / 'instructions.yaml'}: instruction type {t!r} is missing")
            for key in ("role", "requirement", "example", "turns"):
                if key not in ins["types"][t]:
                    raise ValueError(f"{folder / 'instructions.yaml'}: types.{t}.{key} is missing")
            for m in MODALITIES:
                if m not in ins["types"][t]["example"]:
                    raise ValueError(f"{folder / 'instructions.yaml'}: types.{t}.example.{m} is missing")
        return cls(version=str(version), path=str(folder), **parts)

    # -- rendering --------------------------------------------------------------------------
    def _messages(self, system: str, user: str) -> list[dict]:
        return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip()}]

    def fuse(self, kind: str, **fields) -> list[dict]:
        """kind: video ({captions}), audio ({captions}) or audio_visual ({video_caption}, {audio_caption})."""
        return self._messages(self.fusion["system"], self.fusion[kind].format(**fields))

    def content(self, modality: str) -> dict:
        return self.instructions["content"][modality]

    def instruction(self, itype: str, modality: str, context: str) -> list[dict]:
        """ROLE / REQUIREMENT / EXAMPLE / CONTEXT for one cell of Table 1."""
        ins, t = self.instructions, self.instructions["types"][itype]
        names = dict(self.content(modality), turns=t["turns"])
        user = ins["template"].format(
            role=t["role"].format(**names), requirement=t["requirement"].format(**names),
            example=t["example"][modality].format(), context=context, context_name=names["context_name"],
            format=ins["format"].format())
        return self._messages(ins["system"], user)

    def judge_messages(self, itype: str, modality: str, context: str, item_text: str) -> list[dict]:
        user = self.judge["user"].format(context_name=self.content(modality)["context_name"], context=context,
                                         type_name=itype, item=item_text)
        return self._messages(self.judge["system"], user)
