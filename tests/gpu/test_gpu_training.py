"""The GPU fast path (issue 9): bf16 training steps with megatron's fusions and DDP overlaps,
activation recompute, the distributed optimizer saved, loaded and resharded, and Transformer
Engine layers against the local ones. Run by `bench/gpu_check.sh` (`pytest -m gpu`) on a GPU;
in `make test` everything but the fusions and TE runs on the CPU over gloo (the same code:
distributed optimizer, overlaps, bf16, recompute), so a drift in these tests fails CI."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm import config

pytestmark = pytest.mark.gpu
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
needs_cuda = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (megatron's fused kernels, Transformer Engine)")
SEQ, MBS, GBS = 128, 2, 4


def stage2_cfg(*overrides: str, recompute: bool = False):
    return config.load("stage2_finetune", [
        "model=tiny", "model.params_dtype=bf16", "model.build_encoders=false", f"model.seq_length={SEQ}",
        f"model.activations_checkpoint={str(recompute).lower()}",
        f"model.micro_batch_size={MBS}", f"model.global_batch_size={GBS}", "model.optim.lr=1e-3", *overrides]).model


def build(cfg, state: dict | None = None):
    """The tiny AVLLM on the GPU with DDP and the distributed optimizer; `state` = weights to load."""
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import optim

    model = build_model(cfg).to(DEVICE)
    if state is not None:
        model.load_state_dict(state)
    ddp, opt = optim.setup_training(model, cfg, use_distributed_optimizer=True, gpu=True)
    return model, ddp, opt


def batches(model, seed: int = 0):
    from nemo_avllm.training.synthetic_batches import synthetic_batches

    return synthetic_batches(model, GBS // MBS, MBS, SEQ, DEVICE, encoders=False, dtype=torch.bfloat16, seed=seed,
                             mix="mat")


def step(ddp, opt, data, forward_only: bool = False) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_avllm.training.step import forward_step

    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(data), model=[ddp],
                                      num_microbatches=len(data), seq_length=SEQ, micro_batch_size=MBS,
                                      forward_only=forward_only)
    if not forward_only:
        opt.step()
    total = torch.stack([d["lm loss"] for d in out]).sum(0)
    return float(total[0] / total[1])


def test_bf16_training_steps_with_fusions_and_overlaps(dist1):
    cfg = stage2_cfg()
    model, ddp, opt = build(cfg)
    c = model.config
    assert c.bf16 and (c.bias_activation_fusion and c.bias_dropout_fusion) == GPU  # fusions on with a GPU
    assert ddp.ddp_config.overlap_grad_reduce and ddp.ddp_config.overlap_param_gather  # auto = on with GPUs
    assert ddp.ddp_config.use_distributed_optimizer
    data = batches(model)  # MAT micro-batches: V-only, A-only, ...; the last one changes every step
    losses = [step(ddp, opt, data[i % len(data):] + data[:i % len(data)]) for i in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses  # it learns the repeated batch
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}


def test_recompute_gives_the_same_loss(dist1):
    plain, ddp, opt = build(stage2_cfg())
    state = {k: v.clone() for k, v in plain.state_dict().items() if isinstance(v, torch.Tensor)}
    data = batches(plain, seed=1)
    ref = [step(ddp, opt, data) for _ in range(2)]
    recompute_cfg = stage2_cfg(recompute=True)
    model, ddp2, opt2 = build(recompute_cfg, state)
    assert model.config.recompute_granularity == "full"
    got = [step(ddp2, opt2, data) for _ in range(2)]
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-3)


def test_distributed_optimizer_save_load_reshard(dist1, tmp_path):
    from nemo_avllm.model.parallel_layout import local_tensors
    from nemo_avllm.training import checkpoint, optim
    from tests.conftest import REPO, torchrun

    model, ddp, opt = build(stage2_cfg())
    data = batches(model, seed=2)
    for _ in range(2):
        step(ddp, opt, data)
    with optim.params_synced(ddp):  # param-gather overlap: gather before writing
        checkpoint.save(tmp_path / "ckpt", ddp, opt, {"cfg": config.to_dict(stage2_cfg())})
    next_loss = step(ddp, opt, data)

    fresh, ddp2, opt2 = build(stage2_cfg())
    checkpoint.load(tmp_path / "ckpt", ddp2, opt2)
    torch.save({n: t.detach().float().cpu() for n, t in local_tensors(fresh).items()}, tmp_path / "full.pt")
    assert step(ddp2, opt2, data) == pytest.approx(next_loss, rel=1e-4, abs=1e-4)  # weights and Adam state restored

    # reshard: the GPU checkpoint's weights at TP=2 on two CPU (gloo) processes
    torchrun(REPO / "tests" / "gpu" / "reshard_worker.py", 2, str(tmp_path / "ckpt"), str(tmp_path / "full.pt"))


@needs_cuda
def test_transformer_engine_layers_match_local_layers(dist1, tmp_path):
    from nemo_avllm.model import llm
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    if not llm.te_available():
        pytest.skip("Transformer Engine is not installed (NGC containers ship it; pip install 'nemo_avllm[gpu]')")
    assert llm.resolve_transformer_impl("auto") == "transformer_engine"
    local = build_model(stage2_cfg("model.transformer_impl=local")).cuda().eval()
    checkpoint.save(tmp_path / "local", local)
    te = build_model(stage2_cfg("model.transformer_impl=auto")).cuda().eval()
    assert te.cfg.transformer_impl == "transformer_engine"
    checkpoint.load(tmp_path / "local", te)  # local checkpoint -> TE layers (keys shared)
    data = batches(local, seed=3)[0]
    with torch.no_grad():
        kwargs = dict(input_ids=data["input_ids"], features=_features(data), runtime_gather_output=True)
        a, b = local(**kwargs).float(), te(**kwargs).float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max(), float((a - b).abs().max())


def _features(batch):
    from nemo_avllm.model.avllm import EncoderFeatures

    return EncoderFeatures(**batch["features"])
