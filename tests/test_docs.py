"""The README stays a front page and the docs stay true to the repository: every link resolves,
no file cites a document the repository does not hold, and the README's sample path names real
files. Reads text only (no package import), so it is fast."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

# [text](target): the target up to a space or ')' (a title after the space is ignored)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")
CITED_DOCS = ("DESIGN.md", "NOTES.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".toml", ".txt"}


def tracked_text_files() -> list[Path]:
    """Files git tracks (plus new ones not ignored) that are text a reader or the code may cite from."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    paths = [REPO / p for p in out.splitlines()]
    return [p for p in paths if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in ("Dockerfile", "Makefile"))]


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file_and_heading(doc):
    missing = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            missing.append(target)
    assert not missing, f"{doc.relative_to(REPO)} links to files or headings that do not exist: {missing}"


def test_no_file_cites_a_document_the_repository_does_not_hold():
    held = {p.name for p in tracked_text_files()}
    cites = []
    for path in tracked_text_files():
        if path.resolve() == Path(__file__).resolve():
            continue  # this test names them
        text = path.read_text(errors="replace")
        for name in CITED_DOCS:
            if name in text and name not in held:
                line = text[:text.index(name)].count("\n") + 1
                cites.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not cites, "cited documents that are not in the repository:\n" + "\n".join(cites)


def test_every_readme_section_a_file_names_is_in_the_readme():
    """`README: Data`, `README "Known limits"`: a pointer into the README names one of its headings
    (details moved to docs/ are cited by their docs/ file)."""
    headings = [h.strip().lower() for h in re.findall(r"^#+ (.+)$", README.read_text(), re.M)]
    cite = re.compile(r"README(?::\s*|\s+\\?\")([A-Z][\w ]*[\w])")
    stale = []
    for path in tracked_text_files():
        if path.resolve() == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for section in cite.findall(line):
                if not any(h.startswith(section.lower()) for h in headings):
                    stale.append(f"{path.relative_to(REPO)}:{n}: README {section!r}")
    assert not stale, "README sections that are not in README.md:\n" + "\n".join(stale)


def test_the_readme_sample_path_names_at_most_six_files_that_exist():
    text = README.read_text()
    block = text.split("<!-- sample-path -->", 1)[1].split("<!-- /sample-path -->", 1)[0]
    files = re.findall(r"`([\w/]+\.py)`", block)
    assert 2 <= len(files) <= 6, files
    missing = [f for f in files if not (REPO / "nemo_avllm" / f).is_file()]
    assert not missing, f"the README's sample path names files that are not in nemo_avllm/: {missing}"


def test_docs_name_no_renamed_module():
    """Modules renamed by issue 26 are not named by their old paths in the README or docs."""
    stale = re.compile(r"export/|evaluation/run\.py|demo/run\.py|inference/run\.py|launch/run\.py|"
                       r"training/model\.py|\bsynthetic\.py")
    hits = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in [README, *DOCS] for m in stale.finditer(p.read_text())]
    assert not hits, hits
