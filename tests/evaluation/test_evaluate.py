"""`avllm evaluate` end to end on a tiny checkpoint: the real MUSIC-AVQA excerpt, two of its
videos made with ffmpeg under the names the annotations use, the rest missing (counted and
listed); predictions keyed by question id; a rerun resumes instead of answering again."""

from __future__ import annotations

import json
import shutil


from nemo_avllm.evaluation import benchmarks as B
from tests.evaluation.test_readers_metrics import FIXTURES
from tests.inference.test_generate import ckpt  # noqa: F401  (the tiny checkpoint fixture)
from tests.media_factory import make_clip, tone


def test_evaluate_music_avqa_resumes(ckpt, tmp_path):  # noqa: F811
    from nemo_avllm import config
    from nemo_avllm.evaluation.evaluate import compare, main

    ann = tmp_path / "avqa-test.json"
    shutil.copy(FIXTURES / "music_avqa/avqa-test.head150.json", ann)
    items = B.read("music_avqa", annotations=ann)
    videos = tmp_path / "videos"
    videos.mkdir()
    have = ["00000093", "00000153"]
    make_clip(videos / f"{have[0]}.mp4", num_frames=8, audio=tone(1.0, 48000))
    make_clip(videos / f"{have[1]}.mp4", num_frames=8)  # silent: asked with <VIS>
    want = [it.qid for it in items if it.video[:-4] in have]
    over = ["benchmark=music_avqa", f"benchmark.annotations={ann}", f"benchmark.video_root={videos}",
            f"checkpoint={ckpt}", f"out_dir={tmp_path / 'eval'}", "sampling.max_new_tokens=4", "batch_size=4"]
    main(config.load("evaluate", over))
    run = tmp_path / "eval" / "music_avqa"
    res = json.loads((run / "results.json").read_text())
    n_videos = len({it.video for it in items})
    assert res["questions"] == 150 and res["missing_videos"] == n_videos - 2
    assert len((run / "missing_videos.txt").read_text().splitlines()) == n_videos - 2
    preds = [json.loads(line) for line in (run / "predictions.rank0.jsonl").read_text().splitlines()]
    assert sorted(p["qid"] for p in preds) == sorted(want)
    assert {p["modality"] for p in preds} == {"<AUD_VIS>", "<VIS>"}
    assert res["scores"]["exact"]["n"] == len(want) and res["headline"]["paper"] == 47.9
    assert "| music_avqa | exact:accuracy |" in (run / "results.md").read_text()

    # a crash after some answers: drop the last one (and leave a half-written line); the rerun
    # answers only what is missing and ends with the same predictions
    lines = (run / "predictions.rank0.jsonl").read_text().splitlines()
    (run / "predictions.rank0.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    main(config.load("evaluate", over))
    res2 = json.loads((run / "results.json").read_text())
    assert res2["this_run"]["answered_now"] == 1
    again = {json.loads(x)["qid"]: json.loads(x)["prediction"] for x in (run / "predictions.rank0.jsonl").read_text().splitlines()
             if x.startswith("{") and x.endswith("}")}
    assert again == {p["qid"]: p["prediction"] for p in preds}
    assert res2["scores"]["exact"]["accuracy"] == res["scores"]["exact"]["accuracy"]

    # Fig. 5 switch: the same questions asked with <VIS>; compare sets the runs next to the paper
    main(config.load("evaluate", over + ["visual_only=true"]))
    vis = [json.loads(x) for x in (tmp_path / "eval" / "music_avqa_vis" / "predictions.rank0.jsonl").read_text().splitlines()]
    assert sorted(p["qid"] for p in vis) == sorted(want) and {p["modality"] for p in vis} == {"<VIS>"}
    table = compare([str(run), str(tmp_path / "eval" / "music_avqa_vis")])
    assert "| music_avqa | 47.9 |" in table and "music_avqa_vis" in table


def test_run_folder_is_bound_to_what_answered(ckpt, tmp_path):  # noqa: F811
    """Issue 23.1: a rerun with another checkpoint, step or setting does not reuse the folder's
    answers; it is refused (before the model loads) naming the difference. Issue 23.2: a run
    missing media is marked partial in results.json, results.md and compare."""
    import pytest

    from nemo_avllm import config
    from nemo_avllm.errors import UserError
    from nemo_avllm.evaluation.evaluate import compare, main

    ann = tmp_path / "avqa-test.json"
    shutil.copy(FIXTURES / "music_avqa/avqa-test.head150.json", ann)
    videos = tmp_path / "videos"
    videos.mkdir()
    make_clip(videos / "00000093.mp4", num_frames=8, audio=tone(1.0, 48000))
    over = ["benchmark=music_avqa", f"benchmark.annotations={ann}", f"benchmark.video_root={videos}",
            f"out_dir={tmp_path / 'eval'}", "sampling.max_new_tokens=2", "batch_size=4"]
    main(config.load("evaluate", over + [f"checkpoint={ckpt}"]))
    run = tmp_path / "eval" / "music_avqa"
    res = json.loads((run / "results.json").read_text())
    bound = json.loads((run / "run.json").read_text())
    assert res["run"] == bound and bound["model"] == {"checkpoint": str(ckpt.resolve()), "step": None}
    assert res["partial"] and res["answered"] == res["scores"]["exact"]["n"] < res["questions"] == 150
    assert f"(partial: {res['answered']}/150)" in (run / "results.md").read_text()
    assert f"(partial: {res['answered']}/150)" in compare([str(run)])

    other = tmp_path / "stage2" / "run--step=20-last"
    shutil.copytree(ckpt, other)
    with pytest.raises(UserError, match=rf'holds answers of another run \(model.checkpoint: "{ckpt.resolve()}" then, '
                                        rf'"{other.resolve()}" now; model.step: null then, 20 now\)'):
        main(config.load("evaluate", over + [f"checkpoint='{other}'"]))
    with pytest.raises(UserError, match=r"sampling.max_new_tokens: 2 then, 3 now"):
        main(config.load("evaluate", over + [f"checkpoint={ckpt}", "sampling.max_new_tokens=3"]))
    with pytest.raises(UserError, match=r'prompt.answer_hint: " Answer the question using a single word." then, null now'):
        main(config.load("evaluate", over + [f"checkpoint={ckpt}", "benchmark.answer_hint=null"]))
    ann.write_text(ann.read_text().replace('"anser": "two"', '"anser": "three"', 1))
    with pytest.raises(UserError, match=r"benchmark.files.annotations.sha256"):
        main(config.load("evaluate", over + [f"checkpoint={ckpt}"]))
    (run / "run.json").unlink()  # answers of an older version: no record of what produced them
    with pytest.raises(UserError, match=r"no record of the checkpoint and settings"):
        main(config.load("evaluate", over + [f"checkpoint={ckpt}"]))
