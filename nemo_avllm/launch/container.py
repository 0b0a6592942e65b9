"""Install this package into an NGC PyTorch container without replacing the container's builds.

NGC images carry pre-release builds of torch (e.g. `2.14.0a0+gitabc`), torchvision, Transformer
Engine and DALI made for their CUDA, NCCL and Apex. PEP 440 orders `2.14.0a0` before `2.14`, so a
plain `pip install .` would not count the container's torch as meeting `torch>=2.14,<2.15` and would
download PyPI wheels over it. This script reads pyproject.toml, keeps every requirement the image
already meets by release number (torch 2.14.0a0 meets >=2.14), pins those (pip constraints), and
installs the rest; it stops with a clear message when the image's torch is outside pyproject's
range (pick another base tag). Stdlib + `packaging` only: it runs before the package is installed.

    python nemo_avllm/launch/container.py --extras gpu [--dry-run]
"""

from __future__ import annotations

import argparse
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

# must come from the image: installing them from PyPI would replace its CUDA builds
FROM_IMAGE = ("torch", "torchvision", "transformer-engine")
# one requirement, several distribution names (DALI is published per CUDA major)
FAMILIES = {"nvidia-dali-cuda120": ("nvidia-dali-cuda120", "nvidia-dali-cuda130")}


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


def plan(reqs: list[Requirement], installed: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(kept: distribution -> installed version, to_install: requirement strings)."""
    installed = {canonicalize_name(k): v for k, v in installed.items()}
    kept, to_install = {}, []
    for r in reqs:
        name = canonicalize_name(r.name)
        found = [(d, installed[d]) for d in FAMILIES.get(name, (name,)) if d in installed]
        ok = [(d, v) for d, v in found if (rel := release_of(v)) is not None and r.specifier.contains(rel, prereleases=True)]
        if ok:
            kept.update(ok)
        elif name in FROM_IMAGE:
            have = ", ".join(f"{d} {v}" for d, v in found) or "not installed"
            raise SystemExit(
                f"the base image's {name} ({have}) does not meet pyproject's `{r}`: build on an NGC PyTorch "
                f"tag whose {name} is in that range (docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3)"
            )
        else:
            to_install.append(str(r))
    return kept, to_install


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extras", nargs="*", default=[])
    p.add_argument("--project", default=".")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    project = Path(a.project)
    installed = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    kept, to_install = plan(requirements(project / "pyproject.toml", a.extras), installed)
    print("from the image:", ", ".join(f"{k}=={v}" for k, v in sorted(kept.items())))
    print("to install:", ", ".join(to_install))
    if a.dry_run:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{k}=={v}\n" for k, v in sorted(kept.items())))
    constraints = ["-c", f.name]
    if Path("/etc/pip/constraint.txt").is_file():  # NGC's own pins (PIP_CONSTRAINT in the image)
        constraints += ["-c", "/etc/pip/constraint.txt"]
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir"]
    subprocess.run([*pip, *constraints, *to_install], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(project)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
