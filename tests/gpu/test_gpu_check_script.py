"""`bench/gpu_check.sh` is the one prepared device call: it must lint, fit one 600 s call, name
every test that did not pass, and train its benchmarks on MAT-mixed micro-batches."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_script_lints_and_fits_one_device_call():
    text = SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True)
    budget = int(re.search(r"BUDGET_S=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", text).group(1))
    tests = int(re.search(r"TEST_S=\$\{GPU_CHECK_TEST_S:-(\d+)\}", text).group(1))
    overrun = int(re.search(r"left=\$\(\( BUDGET_S \+ (\d+) - ", text).group(1))
    assert budget + overrun < 600 and tests < budget, (budget, overrun, tests)
    pytest_line = next(line for line in text.splitlines() if "-m pytest" in line)
    assert " -ra " in pytest_line and 'timeout "$TEST_S"' in pytest_line, pytest_line
    benches = [line for line in text.splitlines() if re.match(r"\s*(\[.*\] && )?bench \S+ \"\$\{S[12]\[@\]\}\"", line)]
    assert benches and all("--mix mat" in b or "--packing" in b for b in benches), benches
    assert any("--packing on" in b for b in benches) and any("--packing off" in b for b in benches)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the no-GPU answer")
def test_gpu_check_says_why_it_cannot_run_without_a_gpu(tmp_path):
    out = tmp_path / "r.txt"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "skip all: no CUDA device" in out.read_text()
