"""The image build's dependency set: it installs into an NGC PyTorch image without changing what the
image pins (offline: the project's requirements walked through the installed packages' metadata,
against a constraint list in the image's format), keeps the image's own DALI / Transformer Engine,
and stops with one line on an image whose versions do not fit. Plus the HTSAT code kept from
laion_clap (so that the laion-clap package, numpy<2, is not needed) is laion_clap's."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nemo_avllm.launch import container
from tests.conftest import REPO

FIXTURE = Path(__file__).parent / "fixtures" / "ngc_constraint.txt"


def test_dependencies_resolve_against_the_images_pins():
    """Every requirement on the way from pyproject (+ the gpu extra) to its leaves accepts the pinned
    numpy 2 and torch family; laion-clap's numpy<2 did not (ResolutionImpossible in the image)."""
    pins = container.read_pins(FIXTURE)
    assert pins["numpy"].startswith("2.") and pins["torch"].startswith("2.14.0a0")
    proc = subprocess.run([sys.executable, "nemo_avllm/launch/container.py", "--extras", "gpu",
                           "--check-constraints", str(FIXTURE)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the check sees through dependencies: laion-clap 1.1.7 (installed here as the test reference)
    conflicts, _ = container.constraint_conflicts([Requirement("nemo-toolkit[core]"), Requirement("laion-clap==1.1.7")], pins)
    assert conflicts == ["laion-clap requires numpy<2.0.0,>=1.23.5, the image pins numpy==2.1.0"]


IMAGE = {"torch": "2.14.0a0+gitabc", "torchvision": "0.29.0a0+def", "transformer_engine": "2.9.0+40c69e75",
         "numpy": "2.1.0"}


def test_the_images_dali_is_used_and_never_a_second_one():
    reqs = container.requirements(REPO / "pyproject.toml", ["gpu"])
    kept, to_install = container.plan(reqs, {**IMAGE, "nvidia-dali-cuda130": "2.4.1"}, cuda_major=13)
    assert kept["nvidia-dali-cuda130"] == "2.4.1" and not any("dali" in r for r in to_install)
    with pytest.raises(SystemExit, match=r"^the base image's nvidia-dali-cuda120 \(nvidia-dali-cuda130 1.51.0\) does not meet"):
        container.plan(reqs, {**IMAGE, "nvidia-dali-cuda130": "1.51.0"}, cuda_major=13)
    _, to_install = container.plan(reqs, IMAGE, cuda_major=13)  # no DALI in the image: the one for its CUDA
    assert [r for r in to_install if "dali" in r] == ["nvidia-dali-cuda130<2.5,>=2.4"]


def test_an_image_that_pins_a_version_pyproject_refuses_stops_the_build_in_one_line():
    reqs = container.requirements(REPO / "pyproject.toml", ["gpu"])
    with pytest.raises(SystemExit) as e:
        container.plan(reqs, {**IMAGE, "nvidia-dali-cuda130": "2.4.0"}, pins={"megatron-core": "0.15.0"})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the base image pins megatron-core==0.15.0") and "BASE_IMAGE" in msg


def test_htsat_is_laion_claps_code():
    """encoders/htsat.py = laion_clap 1.1.7's clap_module/htsat.py with only the documented changes
    (its two relative imports replaced; create_htsat_model left out). Module names, so checkpoints,
    and outputs stay laion's (tests/training, tests/export load laion checkpoints through it)."""
    from nemo_avllm.model.encoders import htsat
    from nemo_avllm.model.encoders.audio import _htsat_module

    theirs = Path(_htsat_module().__file__).read_text().splitlines()
    ours = Path(htsat.__file__).read_text().splitlines()
    diff = list(difflib.ndiff(theirs[7:979], ours))
    removed = [d[2:] for d in diff if d.startswith("- ")]
    assert removed == ["from .utils import do_mixup, interpolate", "from .feature_fusion import iAFF, AFF, DAF"], removed
    assert "create_htsat_model" in "\n".join(theirs[979:]) and "def create_htsat_model" not in "\n".join(ours)
