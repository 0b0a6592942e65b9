"""The `avllm` command as a user runs it: prepare -> features -> the demo, in real processes."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nemo_avllm.cli import quote_override
from tests.conftest import REPO

AVLLM = [sys.executable, "-m", "nemo_avllm.cli"]


# The toy demos' small pools: MAT never repeats an item within a global batch, so the batch must
# fit the fewest clips of a modality (the demo's default of 32 needs more clips than these).
TOY_BATCH = [f"stage{s}.model.{k}={v}" for s in (1, 2) for k, v in (("global_batch_size", 4), ("micro_batch_size", 2))]


def _run(args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(AVLLM + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"avllm {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_quote_override_quotes_only_plain_values_with_an_equals_sign():
    assert quote_override("model.restore_from=a/run--step=60-last") == "model.restore_from='a/run--step=60-last'"
    assert quote_override("+x=a=b") == "+x='a=b'"
    for unchanged in ("a.b=1", "model=tiny", "--config-name=s", "k='a=b'", "k=\"a=b\"", "k=range(start=1,stop=3)",
                      "k=[a=1]", "k=a=1,b=2", "oops"):
        assert quote_override(unchanged) == unchanged


def test_help_and_unknown_task():
    out = subprocess.run(AVLLM + ["--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "tasks:" in out.stdout and "prepare" in out.stdout
    bad = subprocess.run(AVLLM + ["trian"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task 'trian' (did you mean train?)" in bad.stderr


# ------------------------------------------------------------------------------------------------
# A user's mistake: one line naming the key or file, exit code 2, nothing written or lost
# ------------------------------------------------------------------------------------------------


def _cli(args, cwd, entry=AVLLM, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(entry + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tree(root: Path) -> dict:
    """Every file and folder under root with its size, mtime and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns,
                                         None if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def workdir(tmp_path):
    """A user's folder: a manifest, and an earlier run whose checkpoint folders hold '=' (the names
    older runs were given). No mistake may change anything in it."""
    (tmp_path / "train.jsonl").write_text("{}\n")
    ckpts = tmp_path / "runs" / "demo_stage1" / "checkpoints"
    for name in ("demo_stage1--step=60-last", "demo_stage1--step=40"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "common.pt").write_bytes(os.urandom(64))
    (ckpts.parent / "train_metrics.jsonl").write_text('{"step": 60}\n')
    return tmp_path


def _train_args(workdir: Path, *extra: str) -> list[str]:
    return ["train", "model=tiny", "trainer.devices=1", f"model.data.train_manifest={workdir / 'train.jsonl'}",
            f"exp_manager.exp_dir={workdir / 'runs'}", "name=demo_stage1", *extra]


ROWS = {
    # issue 16's table, one row each (max_steps=1: test_demo_runs_end_to_end; --cfg: tests below)
    "restore_from with '='": (
        ["model.restore_from={ckpts}/demo_stage1--step=40"],
        "model.restore_from={ckpts}/demo_stage1--step=40: is not a dist checkpoint (no metadata.json)"),
    "batch size not a number": (
        ["model.global_batch_size=abc"],
        "model.global_batch_size='abc' is not valid: give a whole number >= 1"),
    "missing manifest": (
        ["model.data.train_manifest={w}/missing.jsonl"],
        "model.data.train_manifest={w}/missing.jsonl: no such file or folder; give a JSON Lines manifest"),
    "missing tokenizer": (
        ["model.tokenizer={w}/vicuna-tokenizer"],
        "model.tokenizer={w}/vicuna-tokenizer: no such file or folder; give the LLM's Hugging Face tokenizer folder"),
    "unknown key": (
        ["model.optim.lrr=1e-4"],
        "model.optim.lrr is not a key of stage1_pretrain; did you mean model.optim.lr?"),
    # more of the same kind
    "learning rate out of range": (["model.optim.lr=-1"], "model.optim.lr=-1 is not valid: give a number > 0"),
    "parallel size": (["model.tensor_model_parallel_size=0"], "model.tensor_model_parallel_size=0 is not valid"),
    "zero steps": (["trainer.max_steps=0"], "trainer.max_steps=0 is not valid: give a whole number >= 1, or -1"),
    "unknown config group option": (["model=tinyy"], "model=tinyy: conf/model/tinyy.yaml does not exist; choose one of"),
    "unreadable override": (["model.optim.lr=[1"], "cannot read the override 'model.optim.lr=[1'"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_a_mistake_is_one_line_with_exit_code_2_and_changes_nothing(workdir, row):
    args, expected = ROWS[row]
    ckpts = workdir / "runs" / "demo_stage1" / "checkpoints"
    fill = dict(w=workdir, ckpts=ckpts)
    before = _tree(workdir)
    proc = _cli(_train_args(workdir, *[a.format(**fill) for a in args]), cwd=workdir)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("avllm train: error: "), proc.stderr
    assert expected.format(**fill) in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _tree(workdir) == before  # no run folder, no checkpoint touched, no Hydra output folder


def test_debug_and_hydra_full_error_show_the_traceback(workdir):
    for extra, env in ((["--debug"], {}), ([], {"HYDRA_FULL_ERROR": "1"})):
        proc = subprocess.run(AVLLM + _train_args(workdir, "model.global_batch_size=abc", *extra), cwd=workdir,
                              env=dict(os.environ, PYTHONPATH=str(REPO), **env), capture_output=True, text=True)
        assert proc.returncode != 0 and "Traceback" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].endswith("model.global_batch_size='abc' is not valid: give a whole "
                                                             "number >= 1 (a multiple of micro batch x data-parallel "
                                                             "size), e.g. model.global_batch_size=256")


def test_a_required_key_left_at_question_marks_is_named(tmp_path):
    proc = _cli(["export-hf", f"out={tmp_path / 'out'}"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "avllm export-hf: error: checkpoint is required (??? in conf/): add checkpoint=...")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# The CLI behaves like the Hydra scripts: --cfg, --help, -m
# ------------------------------------------------------------------------------------------------


def test_cfg_job_and_hydra_print_the_config_like_the_script(tmp_path):
    ckpt = "checkpoints/runs/demo_stage1--step=60-last"
    for mode in ("job", "hydra"):
        args = ["--config-name", "stage2_finetune", "--cfg", mode, "model=tiny", f"model.restore_from={ckpt}"]
        cli = _cli(["train", *args], cwd=tmp_path)
        script = _cli(args, cwd=tmp_path, entry=[sys.executable, str(REPO / "scripts" / "train.py")])
        assert cli.returncode == 0 and script.returncode == 0, cli.stderr + script.stderr
        assert cli.stdout == script.stdout
        if mode == "job":
            cfg = yaml.safe_load(cli.stdout)
            assert cfg["model"]["restore_from"] == ckpt and cfg["model"]["llm"]["name"] == "tiny-llama"
        else:
            assert "hydra:" in cli.stdout and "job_logging" in cli.stdout
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_task_help_lists_keys_with_their_conf_comments():
    cli = _cli(["train", "--help", "--config-name", "stage2_finetune"], cwd=REPO)
    script = _cli(["--help", "--config-name", "stage2_finetune"], cwd=REPO,
                  entry=[sys.executable, str(REPO / "scripts" / "train.py")])
    assert cli.returncode == 0 and cli.stdout.replace("avllm train", "train.py") == script.stdout
    out = cli.stdout
    assert "Stage 2 (paper §3.3, §4.1): fine-tune projectors + LLM" in out  # the file's header comment
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    # stage2_finetune's own comment wins over stage1_pretrain's for the same key
    assert rows["model.restore_from=null"].endswith("the stage-1 checkpoint folder or its run folder (one key: model.restore_from=...)")
    assert rows["trainer.precision=32"].endswith("numerics come from model.params_dtype (megatron mixed precision)")
    # conf/data/av_instruct.yaml's flow mapping: one row with its comment
    assert rows["model.data.mat_ratios={V:"].endswith("Table 1: 80k visual, 25k audio, 55k audio-visual")
    # stage2's value, stage1's comment (stage2_finetune.yaml has none for it)
    assert rows["model.optim.lr=2e-05"].endswith("peak learning rate after warm-up")
    imp = _cli(["import-hf", "--help"], cwd=REPO).stdout  # a comment continued on the next line is kept whole
    assert "Vicuna v1.5 ships fp16 weights: bf16 rounds them" in imp


def test_multirun_runs_each_job_in_the_current_folder(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = _cli(["prepare", "-m", "input=empty.jsonl", "out_dir=a,b", "num_workers=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Launching 2 jobs locally" in proc.stdout
    assert (tmp_path / "a" / "index.jsonl").is_file() and (tmp_path / "b" / "index.jsonl").is_file()


def test_docs_override_examples_run_as_printed(tmp_path):
    """docs/cli.md's Overrides commands, as printed (plus --cfg job: compose and print, no export)."""
    doc = (REPO / "docs" / "cli.md").read_text()
    section = doc.split("## Overrides", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.startswith("avllm ")]
    assert len(commands) == 3 and any("step=1000" in c and "\"" not in c for c in commands)
    for command in commands:
        words = shlex.split(command)
        proc = _cli([*words[1:], "--cfg", "job"], cwd=tmp_path)
        assert proc.returncode == 0, command + "\n" + proc.stderr
        typed = next(w.split("=", 1)[1].strip("'") for w in words if w.startswith(("checkpoint=", "\"checkpoint", "'checkpoint")))
        assert yaml.safe_load(proc.stdout)["checkpoint"] == typed.strip("'")


def test_prepare_then_features_from_the_command_line(tmp_path):
    from nemo_avllm.demo import clips

    paths = clips.generate(tmp_path / "data", 6, 0, seed=3)
    (tmp_path / "data" / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    with open(paths["stage2"], "a") as f:
        f.write(json.dumps({"id": "bad", "video": "videos/broken.mp4",
                            "conversations": [{"from": "human", "value": "<VIS> Hi"}, {"from": "gpt", "value": "x"}]}) + "\n")
    out = _run(["prepare", f"input={paths['stage2']}", f"out_dir={tmp_path / 'prep'}", "num_workers=2",
                f"shards.out_dir={tmp_path / 'shards'}", "shards.samples_per_shard=4"])
    assert "6 prepared" in out and "1 bad" in out
    index = [json.loads(l) for l in (tmp_path / "prep" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 6
    assert "broken.mp4" in (tmp_path / "prep" / "bad_files.jsonl").read_text()
    assert list((tmp_path / "shards").glob("*.tar")) and (tmp_path / "shards" / "shards.json").is_file()
    out = _run(["features", "model=tiny", f"source={tmp_path / 'prep'}", f"index={tmp_path / 'prep'}",
                f"out_dir={tmp_path / 'feat'}", "dtype=fp32", "model.allow_random_init=true"])  # tiny: no weights
    assert "6 encoded" in out
    meta = json.loads((tmp_path / "feat" / "meta.json").read_text())
    assert meta  # hash of the encoder config, T, K, ...


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The main job (`make demo`, docs/demo.md), at toy size: data -> stage 1 -> stage 2 -> evaluation table."""
    tmp_path = tmp_path_factory.mktemp("demo")
    out = _run(["demo", f"out_dir={tmp_path}", "num_train=40", "num_eval=4", "progress_bar=false",
                "stage1.trainer.max_steps=1", "stage2.trainer.max_steps=3", *TOY_BATCH])  # 1 step: warm-up clamps
    return tmp_path, out


def test_demo_runs_end_to_end(demo):
    tmp_path, out = demo
    assert "| question family | chance |" in out
    assert "[demo] avllm generate checkpoint=" in out and "[generate] clip" in out  # raw-clip generate at the end
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k.split("|")[0] for k in results["accuracy"]} == {"colour", "shape", "motion", "pitch", "loudness", "sync"}
    assert (tmp_path / "results.md").is_file()
    last = list((tmp_path / "runs" / "demo_stage2" / "checkpoints").glob("*-last"))
    assert [p.name for p in last] == ["demo_stage2--step_3-last"]  # no '=': typed without quotes
    assert [p.name for p in (tmp_path / "runs" / "demo_stage1" / "checkpoints").iterdir()] == ["demo_stage1--step_1-last"]


def test_demo_is_deterministic_for_a_seed(tmp_path):
    """The same seed (and thread count) gives the same clips, encoders, features, losses and answers:
    docs/demo.md's multi-seed table can be re-run. (The random encoders once followed whatever the
    global RNG held, so every run cached other features.)"""
    def run(name):
        out = tmp_path / name
        _run(["demo", f"out_dir={out}", "num_train=40", "num_eval=3", "progress_bar=false", "seed=0",
              "stage1.trainer.max_steps=2", "stage2.trainer.max_steps=3", *TOY_BATCH])
        losses = [[json.loads(line)["reduced_train_loss"] for line in
                   (out / "runs" / f"demo_stage{s}" / "train_metrics.jsonl").read_text().splitlines()]
                  for s in (1, 2)]
        answers = [json.loads(line)["generated"] for line in (out / "answers.jsonl").read_text().splitlines()]
        return losses, answers, (out / "encoders" / "audio.safetensors").read_bytes()

    first, again = run("a"), run("b")
    assert len(first[0][1]) == 3
    assert first[0] == again[0]  # losses of stage 1 and stage 2, bit for bit
    assert first[1] == again[1]
    assert first[2] == again[2]  # the seeded random encoder weights


def test_evaluate_the_demo_checkpoint_v_vs_av(demo):
    """The demo checkpoint on its held-out clips written as a MUSIC-AVQA benchmark, evaluated as
    docs/demo.md says: with each clip's own token, then visual-only (<VIS>), then side by side."""
    from nemo_avllm.demo.benchmark import evaluate_commands

    tmp_path, _ = demo
    proc = subprocess.run([sys.executable, "-m", "nemo_avllm.demo.benchmark", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    ann = tmp_path / "benchmark" / "avqa-test.json"
    rows = json.loads(ann.read_text())
    held = [json.loads(x) for x in (tmp_path / "data" / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == len({(h["id"], h["family"]) for h in held}) and "avllm evaluate benchmark=music_avqa" in out
    assert all("<" not in r["question_content"] for r in rows)
    ckpt = next((tmp_path / "runs" / "demo_stage2" / "checkpoints").glob("*-last"))
    av, v, cmp = evaluate_commands(tmp_path, ckpt, ann, max_new_tokens=6)
    _run(["evaluate", *av])
    _run(["evaluate", *v])
    runs = {name: tmp_path / "eval" / name for name in ("demo_heldout", "demo_heldout_vis")}
    res = {k: json.loads((d / "results.json").read_text()) for k, d in runs.items()}
    preds = {k: [json.loads(x) for x in (d / "predictions.rank0.jsonl").read_text().splitlines()] for k, d in runs.items()}
    for k in runs:
        assert res[k]["missing_videos"] == 0 and res[k]["scores"]["exact"]["n"] == len(rows)
        assert res[k]["checkpoint"] == str(ckpt) and (runs[k] / "results.md").read_text().startswith("| benchmark |")
        assert {g.split("/")[1] for g in res[k]["scores"]["exact"]["by_type"]} == {h["family"] for h in held}
    with_sound = {h["video"][:-4] for h in held if h["token"] == "<AUD>"}  # audio questions: clips with sound
    video = {str(r["question_id"]): r["video_id"] for r in rows}
    assert {p["modality"] for p in preds["demo_heldout_vis"]} == {"<VIS>"} and res["demo_heldout_vis"]["visual_only"]
    assert all(p["modality"] == ("<AUD_VIS>" if video[p["qid"]] in with_sound else "<VIS>") for p in preds["demo_heldout"])
    assert len(preds["demo_heldout"]) == len(preds["demo_heldout_vis"]) == len(rows)
    table = _run(["evaluate", *cmp])
    assert "| demo_heldout | - |" in table and "demo_heldout_vis" in table
