"""The lmms-eval model plugin on a tiny export, through lmms-eval's own interface.

lmms-eval finds `avllm` through the entry point pyproject.toml declares (group
`lmms_eval.models`); its registry resolves the name to our `lmms` subclass, which is built from a
`--model_args` string and answers lmms-eval `Instance`s. What must hold: `generate_until` answers
what megatron's KV-cache engine answers on the training checkpoint (the export is the same model),
with the modality token chosen from each visual (a video with sound, a silent one, a PIL image)
and `until` cutting the text; `loglikelihood` equals the log-probability computed from the megatron
model's logits, and says "greedy" exactly for the greedy answer.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.inference.test_generate import QUESTION, backend, ckpt, media  # noqa: F401  (fixtures)

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by scripts/setup.sh (pip --no-deps; see docs/evaluation.md)")


def _declared_entry_point() -> str:
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    return f"avllm = {eps['avllm']}"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A folder for sys.path holding the package's entry-point metadata, as `pip install` writes it
    (needed while the installed nemo_avllm predates the entry point; harmless after)."""
    d = tmp_path_factory.mktemp("ep")
    info = d / "nemo_avllm_lmms_plugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nemo_avllm_lmms_plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{_declared_entry_point()}\n")
    return d


@pytest.fixture(scope="module")
def registry(plugin_path):
    installed = any(ep.name == "avllm" for ep in importlib.metadata.entry_points(group="lmms_eval.models"))
    if not installed:
        sys.path.insert(0, str(plugin_path))
        importlib.invalidate_caches()
    import lmms_eval.models as models

    models.MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)  # in case lmms_eval was imported before
    yield models
    if not installed:
        sys.path.remove(str(plugin_path))


@pytest.fixture(scope="module")
def export(ckpt, tmp_path_factory):  # noqa: F811
    from nemo_avllm.hf.export_hf import export_hf

    return export_hf(ckpt, tmp_path_factory.mktemp("lmms") / "hf")


def _requests(kind: str, docs: list[dict], second_arg, task="avqa", split="test"):
    from lmms_eval.api.instance import Instance

    def doc_to_visual(doc):
        return [doc["visual"]]

    return [Instance(request_type=kind, arguments=(doc["question"], second_arg(doc) if callable(second_arg) else second_arg,
                                                   doc_to_visual, i, task, split), idx=i,
                     metadata={"task": task, "doc_id": i, "repeats": 1})
            for i, doc in enumerate(docs)]


def test_generate_until_and_loglikelihood(registry, export, backend, media, tmp_path):  # noqa: F811
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from nemo_avllm import modality
    from nemo_avllm.evaluation.lmms_eval_plugin import AVLLM
    from nemo_avllm.inference.engine import SamplingConfig
    from nemo_avllm.inference.tasks import Question, answer_batch, load_inputs, question_turn

    cls = registry.get_model("avllm")
    assert cls is AVLLM and "avllm" in registry.list_available_models()
    lm = cls.create_from_arg_string(f"pretrained={export},batch_size=2,max_new_tokens=8")

    image = Image.fromarray(np.full((48, 64, 3), 200, np.uint8))
    docs = [{"question": QUESTION, "visual": str(media["av"])}, {"question": QUESTION, "visual": str(media["silent"])},
            {"question": "What is shown?", "visual": image}]
    lm.task_dict = {"avqa": {"test": docs}}
    got = lm.generate_until(_requests("generate_until", docs, {"max_new_tokens": 8, "temperature": 0, "until": []}))

    # the same questions to the training checkpoint through megatron's engine
    image_file = tmp_path / "still.png"
    image.save(image_file)
    tokens = [modality.AUD_VIS_TOKEN, modality.VIS_TOKEN, modality.VIS_TOKEN]
    qs = [Question(str(i), str(v), None, [question_turn(d["question"], t)], t)
          for i, (d, t, v) in enumerate(zip(docs, tokens, [media["av"], media["silent"], image_file]))]
    want = [g.text for g in answer_batch(backend, qs, SamplingConfig(max_new_tokens=8))]
    assert got == want and all(want)

    # `until` cuts the answer where the stop string starts
    stop = want[0][len(want[0]) // 2:][:2]
    cut = lm.generate_until(_requests("generate_until", docs[:1], {"max_new_tokens": 8, "until": [stop]}))
    assert cut == [want[0][: want[0].index(stop)].strip()]

    # loglikelihood of the greedy answer and of another one, against the megatron model's logits
    conts = {0: want[0], 1: "red and blue"}
    ll = lm.loglikelihood(_requests("loglikelihood", docs[:2], lambda d: conts[docs.index(d)]))
    for i, (logp, greedy) in enumerate(ll):
        prompt = backend.prompt(qs[i].turns)
        cont = backend.tokenizer.encode(conts[i], add_special_tokens=False)
        video, audio = load_inputs(backend, qs[i].video, None, qs[i].turns)
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logits = backend.model(ids, features=backend.features([prompt], video, audio), runtime_gather_output=True)
        vocab = lm.backend.model.config.text_config.vocab_size  # the export cuts megatron's padded rows
        lp = torch.log_softmax(logits[0, len(prompt) - 1: -1].float()[:, :vocab], dim=-1)
        assert logp == pytest.approx(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=2e-3)
        assert greedy == (i == 0)

    two = [{"question": "q", "visual": [str(media["av"])] * 2}]
    lm.task_dict = {"avqa": {"test": two}}
    with pytest.raises(ValueError, match="one video, image or audio per question; request 0 of task avqa gives 2"):
        lm.generate_until([Instance("generate_until", ("q", {}, lambda doc: doc["visual"], 0, "avqa", "test"), idx=0,
                                    metadata={"task": "avqa", "doc_id": 0, "repeats": 1})])
    with pytest.raises(ValueError, match="unknown \\['pretrain'\\]"):
        cls.create_from_arg_string(f"pretrained={export},pretrain=x")



TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def test_lmms_eval_cli(plugin_path, export, backend, media, tmp_path):  # noqa: F811
    """`lmms-eval --model avllm --model_args pretrained=EXPORT_DIR` on a task defined in a local
    folder (`--include_path`, a JSON dataset: nothing downloaded); the task's answers are what the
    training checkpoint says, so exact match is 1.0 only when every visual reached the model."""
    import shutil

    from nemo_avllm.inference.engine import SamplingConfig
    from nemo_avllm.inference.tasks import Question, answer_batch, question_turn

    exe = shutil.which("lmms-eval", path=os.path.dirname(sys.executable))
    assert exe, "the lmms-eval command is missing next to python; run scripts/setup.sh"
    keys = [("av", "<AUD_VIS>"), ("silent", "<VIS>")]
    want = [g.text for g in answer_batch(backend, [Question(k, str(media[k]), None, [question_turn(QUESTION, t)], t)
                                                   for k, t in keys], SamplingConfig(max_new_tokens=8))]
    task = tmp_path / "task"
    task.mkdir()
    (task / "qa.json").write_text(json.dumps([{"video": str(media[k]), "question": QUESTION, "answer": a}
                                              for (k, _), a in zip(keys, want)]))
    (task / "utils.py").write_text(TASK_UTILS)
    (task / "avllm_local_qa.yaml").write_text(f"""task: avllm_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task / 'qa.json'}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(plugin_path)]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([exe, "--model", "avllm", "--model_args", f"pretrained={export}", "--batch_size", "2",
                           "--tasks", "avllm_local_qa", "--include_path", str(task), "--output_path", str(tmp_path / "out"),
                           "--log_samples"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0 and "Error during evaluation" not in log, log  # lmms-eval exits 0 on errors
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"]["avllm_local_qa"]
    samples = [json.loads(x) for x in next((tmp_path / "out").rglob("*_samples_*.jsonl")).read_text().splitlines()]
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == want
    assert results["exact_match,none"] == 1.0
