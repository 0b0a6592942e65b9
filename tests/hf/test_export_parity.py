"""`export-hf`: the exported Hugging Face model gives the training model's logits on video + audio
+ text with all three modality tokens, from a TP=1 checkpoint and from a TP=2 x PP=2 one (4 gloo
processes); its parts load alone with plain transformers; nothing is pickled."""

from __future__ import annotations

import json

import pytest
import torch

import nemo_avllm.hf  # noqa: F401  (registers the Auto classes)
from nemo_avllm.hf import hf_model
from tests.conftest import REPO, torchrun
from tests.hf.worker import av_batch, scale_, tiny_cfg

WORKER = REPO / "tests" / "hf" / "worker.py"
TOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dist1, tokenizer_dir):
    """The tiny AVLLM with non-trivial weights, saved as a TP=1 dist checkpoint, its full state
    dict (for the TP2xPP2 worker) and the megatron logits of an AV batch and of text alone."""
    from nemo_avllm.config import to_dict
    from nemo_avllm.model import parallel_layout
    from nemo_avllm.model.provider import build_model
    from nemo_avllm.training import checkpoint

    d = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    scale_(model)
    torch.save({n: t.detach().clone() for n, t in parallel_layout.local_tensors(model).items()}, d / "weights.pt")
    common = to_dict(cfg)
    common["tokenizer"] = str(tokenizer_dir)
    checkpoint.save(d / "ckpt_tp1", model, common={"cfg": common})
    batch = av_batch(model.layout, cfg.llm.vocab_size)
    text = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(batch["input_ids"], video=batch["video"], audio=batch["audio"], runtime_gather_output=True)
        text_logits = model(text, runtime_gather_output=True)
    return {"dir": d, "model": model, "batch": batch, "logits": logits, "text": text, "text_logits": text_logits}


@pytest.fixture(scope="module")
def exported(trained):
    from nemo_avllm.hf.export_hf import export_hf

    return export_hf(trained["dir"] / "ckpt_tp1", trained["dir"] / "hf_tp1")


def _hf_logits(folder, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, hf_model.AVLLMForConditionalGeneration)
    ids = torch.tensor([hf_model.from_placeholder_ids(r, model.config) for r in batch["input_ids"].tolist()])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values_videos=batch["video"], audio_values=batch["audio"]).logits


def test_tp1_export_gives_megatron_logits(trained, exported):
    got = _hf_logits(exported, trained["batch"])
    diff = (got - trained["logits"]).abs().max().item()
    print(f"export from TP=1: max |HF - megatron| = {diff:.2e} (logits up to {trained['logits'].abs().max():.2f})")
    assert got.shape == trained["logits"].shape and diff <= TOL


@pytest.mark.distributed
def test_tp2_pp2_export_gives_megatron_logits(trained, tokenizer_dir):
    from nemo_avllm.hf.export_hf import export_hf

    d = trained["dir"]
    torchrun(WORKER, 4, "--mode", "save", "--tp", "2", "--pp", "2", "--weights", str(d / "weights.pt"),
             "--ckpt", str(d / "ckpt_tp2pp2"), "--tokenizer", str(tokenizer_dir))
    out = export_hf(d / "ckpt_tp2pp2", d / "hf_tp2pp2")
    got = _hf_logits(out, trained["batch"])
    diff = (got - trained["logits"]).abs().max().item()
    print(f"export from TP=2 x PP=2: max |HF - megatron| = {diff:.2e}")
    assert diff <= TOL


def test_single_modality_tokens_expand_like_training(trained, exported):
    """Ids with one `<AUD_VIS>`/`<VIS>`/`<AUD>` token each (as a tokenizer gives them) expand to
    the training layout: same logits as the expanded ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    c = model.config
    lay = c.layout()
    row = trained["batch"]["input_ids"][0].tolist()
    single, i = [], 0
    while i < len(row):  # collapse each expansion back to its token (order: <AUD_VIS>, <VIS>, <AUD>)
        for token, tid in ((hf_model.modality.AUD_VIS_TOKEN, c.aud_vis_token_id), (hf_model.modality.VIS_TOKEN, c.vis_token_id),
                           (hf_model.modality.AUD_TOKEN, c.aud_token_id)):
            exp = lay.expansion(token)
            if row[i:i + len(exp)] == exp:
                single.append(tid)
                i += len(exp)
                break
        else:
            single.append(row[i])
            i += 1
    assert single.count(c.aud_vis_token_id) == single.count(c.vis_token_id) == single.count(c.aud_token_id) == 1
    b = trained["batch"]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([single]), pixel_values_videos=b["video"][:1], audio_values=b["audio"][:1]).logits
    assert got.shape == trained["logits"][:1].shape
    assert (got - trained["logits"][:1]).abs().max().item() <= TOL


def test_llm_alone_is_a_plain_llama(trained, exported):
    from transformers import AutoTokenizer, LlamaForCausalLM

    llm, info = LlamaForCausalLM.from_pretrained(exported / "llm", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        got = llm(trained["text"]).logits
    diff = (got - trained["text_logits"]).abs().max().item()
    print(f"plain LlamaForCausalLM vs megatron, text only: max |diff| = {diff:.2e}")
    assert diff <= TOL
    plain, full = AutoTokenizer.from_pretrained(exported / "llm"), AutoTokenizer.from_pretrained(exported)
    config = json.loads((exported / "config.json").read_text())
    assert "<VIS>" not in plain.get_vocab()
    for token, key in (("<VIS>", "vis_token_id"), ("<AUD>", "aud_token_id"), ("<AUD_VIS>", "aud_vis_token_id")):
        assert token in full.all_special_tokens and full.convert_tokens_to_ids(token) == config[key]


def test_encoders_load_alone_and_back(trained, exported):
    """vision/ and audio/ load in plain transformers with every tensor used, and back into the
    open_clip / laion encoders with the training model's exact weights."""
    from dataclasses import replace

    from transformers import ClapAudioModel, CLIPVisionModelWithProjection

    from nemo_avllm.model.encoders import AudioEncoder, VisionEncoder

    for cls, sub in ((CLIPVisionModelWithProjection, "vision"), (ClapAudioModel, "audio")):
        _, info = cls.from_pretrained(exported / sub, output_loading_info=True)
        assert not any(info.values()), (sub, info)
    m = trained["model"]
    vision = VisionEncoder(replace(m.cfg.vision, checkpoint=str(exported / "vision")))
    audio = AudioEncoder(replace(m.cfg.audio, checkpoint=str(exported / "audio")))
    unused_head = ("htsat.tscam_conv.", "htsat.head.")  # laion's AudioSet classifier: not exported
    for mine, theirs in ((vision.state_dict(), m.vision.state_dict()), (audio.state_dict(), m.audio.state_dict())):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith(unused_head))


def test_folder_is_safetensors_and_records_the_layout(exported):
    files = [p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert {"llm/model.safetensors", "vision/model.safetensors", "audio/model.safetensors", "projectors.safetensors"} <= set(files)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "avllm" and config["architectures"] == ["AVLLMForConditionalGeneration"]
    assert (config["num_frames"], config["num_patches"], config["num_audio_segments"]) == (4, 16, 2)
    assert config["vision_feature_layer"] == 2  # block 1 of 3 (feature_layer=-2) -> hidden_states[2]
    assert (config["image_size"], config["sample_rate"], config["clip_samples"], config["mel_bins"]) == (64, 48000, 480000, 64)


def test_save_pretrained_round_trip(trained, exported, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(exported).save_pretrained(tmp_path / "again")
    assert torch.equal(_hf_logits(tmp_path / "again", trained["batch"]), _hf_logits(exported, trained["batch"]))


def test_expand_modality_tokens_pads_masks_and_is_idempotent():
    """Rows that grow differently are re-padded on the input's padding side; masks follow their
    tokens, modality positions carry no loss, and expanded ids stay as they are."""
    c = hf_model.AVLLMConfig(num_frames=2, num_patches=3, num_audio_segments=2,
                             vis_token_id=600, aud_token_id=601, aud_vis_token_id=602)
    V, A, AV = 600, 601, 602
    ids = torch.tensor([[0, 0, 1, 5, V, 6], [1, 5, AV, 6, A, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 1, 5, 9, 6], [1, 5, 9, 6, 9, 7]])
    exp = hf_model.expand_modality_tokens(ids, c, mask, labels)
    assert exp.input_ids.tolist() == [[0] * 3 + [0, 0, 1, 5] + [V] * 5 + [6],  # left padding kept
                                      [1, 5] + [V] * 5 + [A] * 2 + [6] + [A] * 2 + [7]]
    assert exp.attention_mask.tolist() == [[0] * 5 + [1] * 8, [1] * 13]
    assert exp.labels.tolist() == [[-100] * 5 + [1, 5] + [-100] * 5 + [6], [1, 5] + [-100] * 7 + [6, -100, -100, 7]]
    again = hf_model.expand_modality_tokens(exp.input_ids, c, exp.attention_mask)
    assert torch.equal(again.input_ids, exp.input_ids) and torch.equal(again.attention_mask, exp.attention_mask)
    # the training view of the same positions: T temporal then N spatial, K audio
    ph = hf_model.placeholder_ids(exp.input_ids, c)[1].tolist()
    t, s, a = hf_model.modality.TEMPORAL_ID, hf_model.modality.SPATIAL_ID, hf_model.modality.AUDIO_ID
    assert ph == [1, 5, t, t, s, s, s, a, a, 6, a, a, 7]
    with pytest.raises(ValueError, match="not a multiple of 5: expand the ids first"):
        hf_model.placeholder_ids(torch.tensor([[1, V, V, 2]]), c)


def test_auto_classes_build_the_model(exported):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(exported)
    assert isinstance(config, hf_model.AVLLMConfig)
    assert isinstance(AutoModel.from_config(config), hf_model.AVLLMForConditionalGeneration)
