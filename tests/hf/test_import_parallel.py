"""An import-hf checkpoint (saved at TP=1/PP=1) loads resharded at TP=2 and at PP=2 (2 gloo
processes each) and gives the Hugging Face model's logits."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm.hf import hf_model  # noqa: F401  (transformers models before megatron's CPU shims)
from tests.conftest import REPO, torchrun
from tests.hf.worker import tiny_cfg, tiny_hf_llama

pytestmark = pytest.mark.distributed
WORKER = REPO / "tests" / "hf" / "worker.py"
TOL = 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory, dist1):
    from nemo_avllm.hf.import_hf import import_hf

    d = tmp_path_factory.mktemp("import_parallel")
    hf = tiny_hf_llama(d / "hf")
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(ids, d / "ids.pt")
    with torch.no_grad():
        torch.save(hf(ids).logits, d / "hf_logits.pt")
    import_hf(d / "hf", d / "ckpt", tiny_cfg())
    return d


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_import_loads_at_tp_pp_with_hf_logits(imported, tp, pp):
    out = imported / f"logits_tp{tp}_pp{pp}.pt"
    torchrun(WORKER, tp * pp, "--mode", "logits", "--tp", str(tp), "--pp", str(pp), "--ckpt", str(imported / "ckpt"),
             "--ids", str(imported / "ids.pt"), "--out", str(out))
    got = torch.load(out, weights_only=True)
    ref = torch.load(imported / "hf_logits.pt", weights_only=True)
    diff = (got - ref).abs().max().item()
    print(f"import at TP={tp} PP={pp}: max |megatron - HF| = {diff:.2e}")
    assert got.shape == ref.shape and diff <= TOL
