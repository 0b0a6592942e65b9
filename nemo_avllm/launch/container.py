"""Install this package into an NGC PyTorch container without replacing the container's builds.

NGC images carry pre-release builds of torch (e.g. `2.14.0a0+gitabc`), torchvision, Transformer
Engine and DALI made for their CUDA, NCCL and Apex. PEP 440 orders `2.14.0a0` before `2.14`, so a
plain `pip install .` would not count the container's torch as meeting `torch>=2.14,<2.15` and would
download PyPI wheels over it. This script reads pyproject.toml, keeps every requirement the image
already meets by release number (torch 2.14.0a0 meets >=2.14), pins those (pip constraints), and
installs the rest; it stops with a clear message when the image's torch is outside pyproject's
range (pick another base tag). Stdlib + `packaging` only: it runs before the package is installed.

The image's pins (`/etc/pip/constraint.txt`, NGC since 25.03) are never changed: a requirement the
image's pinned version does not meet stops the build with one line (`plan`), and
`constraint_conflicts` walks pyproject's requirements through every dependency's own metadata to
find what no pip install could resolve (laion-clap's `numpy<2` against the image's numpy 2) -
offline, from the installed packages' metadata (`make test`, tests/launch/test_container.py).
DALI and Transformer Engine come from the image when it has them: one DALI, never a second one
for another CUDA major beside the image's.

    python nemo_avllm/launch/container.py --extras gpu [--dry-run]
    python nemo_avllm/launch/container.py --extras gpu --check-constraints tests/launch/fixtures/ngc_constraint.txt
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

CONSTRAINTS = "/etc/pip/constraint.txt"  # NGC's pins (PIP_CONSTRAINT in the image)

# must come from the image: installing them from PyPI would replace its CUDA builds
FROM_IMAGE = ("torch", "torchvision", "transformer-engine")
# one requirement, several distribution names (DALI is published per CUDA major): the image's one
# is used when present, else the one for the image's CUDA major
FAMILIES = {"nvidia-dali-cuda120": ("nvidia-dali-cuda120", "nvidia-dali-cuda130")}
FAMILY_BY_CUDA = {"nvidia-dali-cuda120": "nvidia-dali-cuda{major}0"}


def read_pins(path) -> dict[str, str]:
    """`name==version` lines of a pip constraints file (comments, options and ranges left out)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*([^\s;#]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _installed_requires(name: str) -> list[str] | None:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def constraint_conflicts(reqs: list[Requirement], pins: dict[str, str], requires=_installed_requires) -> tuple[list[str], list[str]]:
    """(conflicts, unchecked): every requirement on the way from `reqs` through each package's
    declared dependencies (`requires(name)`: its Requires-Dist, None when unknown) that the pinned
    version of a package does not meet, as `a -> b requires x<2, the image pins x==2.1`; and the
    packages whose dependencies are unknown here. The image's own builds (`FROM_IMAGE`, DALI) bring
    their dependencies with them and are not walked."""
    pins = {canonicalize_name(k): v for k, v in pins.items()}
    image_own = set(FROM_IMAGE) | {d for fam in FAMILIES.values() for d in fam}
    conflicts, unchecked, seen = [], [], set()
    stack = [(r, ()) for r in reqs]
    while stack:
        r, chain = stack.pop()
        name = canonicalize_name(r.name)
        if name in pins:
            rel = release_of(pins[name])
            if rel is None or not r.specifier.contains(rel, prereleases=True):
                via = " -> ".join(chain) or "pyproject"
                conflicts.append(f"{via} requires {r}, the image pins {name}=={pins[name]}")
        key = (name, tuple(sorted(r.extras)))
        if key in seen or name in image_own:
            continue
        seen.add(key)
        declared = requires(name)
        if declared is None:
            unchecked.append(name)
            continue
        for line in declared:
            sub = Requirement(line)
            envs = [dict(default_environment(), extra=e) for e in ("", *r.extras)]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                stack.append((sub, (*chain, name)))
    return sorted(set(conflicts)), sorted(set(unchecked))


def release_of(version: str) -> Version | None:
    """`2.14.0a0+gitabc` -> 2.14.0: the release a pre-release / local build belongs to."""
    try:
        return Version(".".join(str(x) for x in Version(version).release))
    except InvalidVersion:
        return None


def requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"{pyproject}: no optional-dependencies extra {extra!r}")
        reqs += project["optional-dependencies"][extra]
    env = default_environment()
    return [r for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate(env)]


def plan(reqs: list[Requirement], installed: dict[str, str], pins: dict[str, str] | None = None,
         cuda_major: int | None = None) -> tuple[dict[str, str], list[str]]:
    """(kept: distribution -> installed version, to_install: requirement strings). Stops with one
    line when the image's torch / torchvision / Transformer Engine / DALI, or a version the image
    pins (`pins`), does not meet pyproject."""
    installed = {canonicalize_name(k): v for k, v in installed.items()}
    pins = {canonicalize_name(k): v for k, v in (pins or {}).items()}
    kept, to_install = {}, []
    for r in reqs:
        name = canonicalize_name(r.name)
        found = [(d, installed[d]) for d in FAMILIES.get(name, (name,)) if d in installed]
        ok = [(d, v) for d, v in found if (rel := release_of(v)) is not None and r.specifier.contains(rel, prereleases=True)]
        if ok:
            kept.update(ok)
        elif name in FROM_IMAGE or (name in FAMILIES and found):
            have = ", ".join(f"{d} {v}" for d, v in found) or "not installed"
            raise SystemExit(
                f"the base image's {name} ({have}) does not meet pyproject's `{r}`: build on an NGC PyTorch "
                f"tag whose {name} is in that range (docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3)"
            )
        elif name in pins and not r.specifier.contains(release_of(pins[name]) or Version("0"), prereleases=True):
            raise SystemExit(
                f"the base image pins {name}=={pins[name]} ({CONSTRAINTS}), which does not meet pyproject's `{r}`: "
                f"build on an NGC PyTorch tag whose {name} is in that range (--build-arg BASE_IMAGE=...)"
            )
        else:
            if name in FAMILY_BY_CUDA and cuda_major:  # no DALI in the image: the one for its CUDA
                r = Requirement(str(r).replace(r.name, FAMILY_BY_CUDA[name].format(major=cuda_major), 1))
            to_install.append(str(r))
    return kept, to_install


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extras", nargs="*", default=[])
    p.add_argument("--project", default=".")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--check-constraints", metavar="FILE",
                   help="only check pyproject's requirements (through the installed packages' metadata) against FILE's pins")
    a = p.parse_args(argv)
    project = Path(a.project)
    reqs = requirements(project / "pyproject.toml", a.extras)
    if a.check_constraints:
        conflicts, unchecked = constraint_conflicts(reqs, read_pins(a.check_constraints))
        for c in conflicts:
            print(f"conflict: {c}")
        if unchecked:
            print("dependencies not checked (not installed here):", ", ".join(unchecked))
        return 1 if conflicts else 0
    installed = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    pins = read_pins(CONSTRAINTS) if Path(CONSTRAINTS).is_file() else {}
    cuda = _torch_cuda_major()
    kept, to_install = plan(reqs, installed, pins, cuda)
    print("from the image:", ", ".join(f"{k}=={v}" for k, v in sorted(kept.items())))
    print("to install:", ", ".join(to_install))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{k}=={v}\n" for k, v in sorted(kept.items())))
    constraints = ["-c", f.name] + (["-c", CONSTRAINTS] if pins else [])
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir", *constraints]
    # pip's resolver over the whole set first: nothing is installed unless all of it fits the image's pins
    if subprocess.run([*pip, "--dry-run", "--quiet", *to_install]).returncode != 0:
        raise SystemExit(f"pip cannot install pyproject's dependencies into this image without changing a package "
                         f"it pins ({CONSTRAINTS}; pip's reason above): relax that requirement or pick another BASE_IMAGE")
    if a.dry_run:
        return 0
    subprocess.run([*pip, *to_install], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps", "-e", str(project)], check=True)
    return 0


def _torch_cuda_major() -> int | None:
    try:
        import torch

        return int(str(torch.version.cuda).split(".")[0]) if torch.version.cuda else None
    except Exception:  # noqa: BLE001 (no torch: plan() refuses the image anyway)
        return None


if __name__ == "__main__":
    sys.exit(main())
