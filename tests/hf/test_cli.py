"""`avllm import-hf` and `scripts/export_hf.py` as a user runs them, in real processes:
HF folder -> dist checkpoint -> HF folder returns the same tensors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

from tests.conftest import REPO
from tests.hf.worker import tiny_hf_llama


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def test_import_then_export_from_the_command_line(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    tiny_hf_llama(tmp_path / "hf")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "hf" / f.name)
    ckpt = tmp_path / "imported--step=0-last"  # '=' in a folder name: typed unquoted in both entry points
    out = _run(["-m", "nemo_avllm.cli", "import-hf", "model=tiny", f"hf_dir={tmp_path / 'hf'}", f"out={ckpt}"])
    assert f"model.restore_from={ckpt}" in out
    _run(["scripts/export_hf.py", f"checkpoint={ckpt}", f"out={tmp_path / 'out'}", "llm_only=true"])
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "llm" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_importing_the_package_stays_light_and_registers_lazily():
    """`import nemo_avllm.hf` imports neither torch nor transformers, yet afterwards transformers'
    Auto classes know `model_type: avllm` (registered when they are first imported); `import
    nemo_avllm` alone imports nothing of the package."""
    _run(["-c", "import sys, nemo_avllm.hf; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"])
    _run(["-c", "import sys, nemo_avllm; assert not [m for m in sys.modules if m.startswith('nemo_avllm.')], sorted(sys.modules)"])
    code = ("import nemo_avllm.hf\n"
            "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
            "c = AutoConfig.for_model('avllm')\n"
            "print(type(c).__name__, AutoModelForCausalLM._model_mapping[type(c)].real().__name__,"
            " AutoModel._model_mapping[type(c)].real().__name__)")
    out = _run(["-c", code])
    assert "AVLLMConfig AVLLMForConditionalGeneration AVLLMForConditionalGeneration" in out
