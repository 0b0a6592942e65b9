"""`generate` of the exported model answers a question about a video.

The tiny AVLLM first learns a rule only the video can answer (the colour of the clip: red,
green or blue; the question is always the same), then is exported. On clips it never saw,
Hugging Face greedy `generate` must name the right colour for every colour, token for token
what megatron's `greedy_generate` says. A model that ignored the video, or an export that lost
the vision path, could at best be right for one colour of three."""

from __future__ import annotations

import pytest
import torch

import nemo_avllm.hf  # noqa: F401  (registers the Auto classes)
from nemo_avllm.hf import hf_model
from nemo_avllm.model.encoders.vision import CLIP_MEAN, CLIP_STD
from tests.hf.worker import tiny_cfg

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9)}
QUESTION = [{"from": "human", "value": "<VIS> What colour is the video?"}]


def clip(colour: str, g: torch.Generator, frames: int = 4, size: int = 64) -> torch.Tensor:
    """A CLIP-normalised clip of one colour with noise and random brightness."""
    rgb = torch.tensor(COLOURS[colour]) * (0.7 + 0.3 * torch.rand(1, generator=g))
    pix = (rgb.view(1, 3, 1, 1) + 0.1 * torch.randn(frames, 3, size, size, generator=g)).clamp(0, 1)
    return (pix - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dist1, tokenizer, tokenizer_dir):
    from nemo_avllm.config import to_dict
    from nemo_avllm.data.collate import collate_tokens
    from nemo_avllm.data.conversation import tokenize_conversation
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    params = [p for n, p in model.named_parameters() if n.startswith(("llm.", "proj_"))]
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    names = list(COLOURS)
    losses = []
    for step in range(80):
        picks = [names[(step + i) % 3] for i in range(6)]
        samples = [tokenize_conversation(QUESTION + [{"from": "gpt", "value": c}], tokenizer, model.layout) for c in picks]
        batch = collate_tokens(samples)
        video = torch.stack([clip(c, g) for c in picks])
        loss = model(batch["input_ids"], labels=batch["labels"], video=video)
        mask = batch["loss_mask"].float()
        loss = (loss * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"colour rule: loss {losses[0]:.2f} -> {losses[-1]:.3f}")
    model.eval()
    d = tmp_path_factory.mktemp("generate")
    common = to_dict(cfg)
    common["tokenizer"] = str(tokenizer_dir)
    checkpoint.save(d / "ckpt", model, common={"cfg": common})
    return model, d


def test_exported_model_answers_about_the_video(trained, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_avllm.hf.export_hf import export_hf
    from nemo_avllm.inference.generate import greedy_generate, prompt_ids

    model, d = trained
    out = export_hf(d / "ckpt", d / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_model.encode_conversation(hf_tok, QUESTION, hf.config)
    g = torch.Generator().manual_seed(99)  # clips not seen in training
    for colour in COLOURS:
        for _ in range(2):
            video = clip(colour, g).unsqueeze(0)
            want = greedy_generate(model, [prompt_ids(QUESTION, tokenizer, model.layout)], video=video, max_new_tokens=6)[0]
            ids = hf.generate(torch.tensor([prompt]), pixel_values_videos=video, max_new_tokens=6, do_sample=False)[0]
            new = ids[len(prompt):].tolist()
            got = new[: new.index(hf_tok.eos_token_id)] if hf_tok.eos_token_id in new else new
            answer = hf_tok.decode(got, skip_special_tokens=True).strip()
            print(f"{colour}: HF says {answer!r}, megatron says {tokenizer.decode(want)!r}")
            assert got == want
            assert answer == colour
