"""The image build's dependency set: it installs into an NGC PyTorch image without changing what the
image pins (offline: the project's requirements walked through the installed packages' metadata,
against a constraint list in the image's format), keeps the image's own DALI / Transformer Engine,
and stops with one line on an image whose versions do not fit. Plus the HTSAT code kept from
laion_clap (so that the laion-clap package, numpy<2, is not needed) is laion_clap's."""

from __future__ import annotations

import ast
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


def _sources(path) -> dict[str, list[str]]:
    """The source lines of each top-level definition of a file, and of each method as `Class.method`."""
    src = Path(path).read_text()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = [line.rstrip() for line in ast.get_source_segment(src, node).splitlines()]
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, ast.FunctionDef):
                    out[f"{node.name}.{m.name}"] = [line.rstrip() for line in ast.get_source_segment(src, m).splitlines()]
    return out


def _without_docstring(lines: list[str]) -> str:
    fn = ast.parse("\n".join(lines)).body[0]
    if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant):
        fn.body = fn.body[1:]
    return ast.unparse(fn)


def test_htsat_is_laion_claps_code():
    """encoders/htsat/ (layers, swin, model) = laion_clap 1.1.7's clap_module/htsat.py, definition by
    definition, with only the documented changes: create_htsat_model left out, do_mixup/interpolate
    copied from its utils.py, and the resize step that starts reshape_wav2img and repeat_wat2img
    written once (to_swin_size). Module names, so checkpoints, and outputs stay laion's
    (tests/training, tests/hf load laion checkpoints through it)."""
    from nemo_avllm.model.encoders.htsat import layers, model, swin
    from tests.laion_reference import laion_htsat_module

    reference = laion_htsat_module()
    theirs = _sources(reference.__file__)
    utils = _sources(Path(reference.__file__).with_name("utils.py"))
    ours = {k: v for m in (layers, swin, model) for k, v in _sources(m.__file__).items()}
    cls = "HTSAT_Swin_Transformer"
    assert set(theirs) - set(ours) == {"create_htsat_model"}
    assert set(ours) - set(theirs) == {"_no_fusion", "do_mixup", "interpolate", f"{cls}.to_swin_size"}
    for name in ("do_mixup", "interpolate"):  # the same code, without utils.py's docstrings
        assert _without_docstring(ours[name]) == _without_docstring(utils[name]), name
    changed = {cls, f"{cls}.reshape_wav2img", f"{cls}.repeat_wat2img"}
    for name in set(theirs) - changed - {"create_htsat_model"}:
        assert ours[name] == theirs[name], name
    resize = ours[f"{cls}.to_swin_size"][1:-1]  # its body without `def` and `return x`
    assert ours[f"{cls}.to_swin_size"][-1] == "        return x"
    for name in ("reshape_wav2img", "repeat_wat2img"):
        t = theirs[f"{cls}.{name}"]
        assert t[1 : 1 + len(resize)] == resize, name
        assert ours[f"{cls}.{name}"] == [t[0], "        x = self.to_swin_size(x)", *t[1 + len(resize):]], name
