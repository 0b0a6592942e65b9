"""Benchmark readers on the real annotation excerpts (../shared/fixtures/annotations, copied), and
the judge-free metrics on hand-computed cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_avllm.evaluation import benchmarks as B
from nemo_avllm.evaluation import metrics as M
from tests.conftest import REPO

FIXTURES = REPO.parent / "shared" / "fixtures" / "annotations"
if not FIXTURES.is_dir():  # a worktree sits one level deeper than the main checkout
    FIXTURES = REPO.parents[1] / "shared" / "fixtures" / "annotations"


@pytest.fixture(scope="module")
def ann(tmp_path_factory) -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"annotation fixtures not found at {FIXTURES} (../shared/fixtures/annotations)")
    d = tmp_path_factory.mktemp("ann")
    shutil.copytree(FIXTURES, d, dirs_exist_ok=True)
    return d


def test_msrvtt_qa(ann):
    items = B.read("msrvtt_qa", annotations=ann / "msrvtt_qa/who_test_qa_1000.head150.json")
    assert len(items) == 150
    it = items[0]
    assert (it.qid, it.video, it.question, it.answer) == ("170871", "video7010.mp4", "who writes instructions on his computer?", "guy")


def test_msvd_qa_uses_the_youtube_mapping(ann):
    items = B.read("msvd_qa", annotations=ann / "msvd_qa/test_qa.head150.json", mapping=ann / "msvd_qa/youtube_mapping.subset.txt")
    assert len(items) == 150
    assert items[0].video == "jfrrO5K_vKM_55_65.avi" and items[0].qid == "37348"
    assert {it.video for it in items} == {f"{line.split()[0]}.avi" for line in
                                         (ann / "msvd_qa/youtube_mapping.subset.txt").read_text().splitlines()}
    bad = ann / "bad_mapping.txt"
    bad.write_text("jfrrO5K_vKM_55_65 vid1451\n")
    with pytest.raises(B.AnnotationError, match="video_id 1452 is not in the mapping"):
        B.read("msvd_qa", annotations=ann / "msvd_qa/test_qa.head150.json", mapping=bad)


def test_activitynet_pairs_questions_and_answers_by_id(ann):
    items = B.read("activitynet_qa", questions=ann / "activitynet_qa/test_q.head150.json",
                   answers=ann / "activitynet_qa/test_a.head150.json")
    assert len(items) == 150
    assert (items[0].qid, items[0].video, items[0].question, items[0].answer) == \
        ("v_1QIUV7WYKXg_3", "v_1QIUV7WYKXg.mp4", "is the athlete wearing trousers?", "no")
    assert sum(it.meta["type"] == "yes_no" for it in items) == 149
    # answers in another order still pair by id; a missing answer is an error naming the id
    a = json.loads((ann / "activitynet_qa/test_a.head150.json").read_text())
    (ann / "a_rev.json").write_text(json.dumps(a[::-1]))
    again = B.read("activitynet_qa", questions=ann / "activitynet_qa/test_q.head150.json", answers=ann / "a_rev.json")
    assert [(i.qid, i.answer) for i in again] == [(i.qid, i.answer) for i in items]
    (ann / "a_short.json").write_text(json.dumps(a[1:]))
    with pytest.raises(B.AnnotationError, match="v_1QIUV7WYKXg_3"):
        B.read("activitynet_qa", questions=ann / "activitynet_qa/test_q.head150.json", answers=ann / "a_short.json")


def test_music_avqa_fills_templates_and_reads_anser(ann):
    items = B.read("music_avqa", annotations=ann / "music_avqa/avqa-test.head150.json")
    assert len(items) == 150
    by_id = {it.qid: it for it in items}
    assert by_id["12"].answer == "one" and by_id["12"].video == "00000093.mp4"
    filled = [it for it in items if "violin" in it.question and "always playing" in it.question]
    assert filled and filled[0].question == "Is the violin in the video always playing?"
    lr = next(it for it in items if "rhythmic" in it.question)
    assert lr.question == "Is the instrument on the right more rhythmic than the instrument on the left?"
    assert not any("<" in it.question or "\uff1f" in it.question for it in items)
    assert any(it.answer == "acoustic guitar" for it in items)
    assert by_id["12"].meta["type"] == "Audio/Counting"


def test_avsd_last_turn_with_history(ann):
    items = B.read("avsd", annotations=ann / "avsd/lbl_test_set4DSTC7-AVSD.head150.json")
    assert len(items) == 150
    it = next(i for i in items if i.qid == "YEDU4")
    assert it.question == "is he looking at something outside the window ?"
    assert it.answer.startswith("i cannot tell")
    assert it.history == [("hello . did someone come to the door ?", "no and it is a window that he is standing in front of .")]
    caps = B.read("avsd_cap", annotations=ann / "avsd/lbl_test_set4DSTC7-AVSD.head150.json")
    assert sum(len(c.answer) == 1 for c in caps) == 5  # five dialogs have an empty summary


def test_avssd_video_audio_and_label(ann):
    items = B.read("avssd", annotations=ann / "avssd/testdata_formatted.head150.json")
    assert len(items) == 150
    it = items[0]
    assert (it.qid, it.video, it.audio) == ("-0BIyqJj9ZU_000030", "-0BIyqJj9ZU_000030.mp4", "-0BIyqJj9ZU_000030.wav")
    assert it.meta["label"] == "people belly laughing"
    assert all(i.meta["label"] for i in items)  # all four answer templates understood


def test_nextqa_multiple_choice(ann):
    items = B.read("nextqa", annotations=ann / "nextqa/val.head150.csv")
    assert len(items) == 150
    it = items[0]
    assert it.qid == "4010069381_6" and it.video == "4010069381.mp4"
    assert it.options[0] == "roll the handle" and it.answer == "roll the handle" and it.meta["answer_index"] == 0
    (ann / "map.json").write_text(json.dumps({"4010069381": "1006/4010069381"}))
    with pytest.raises(B.AnnotationError, match="not in the mapping"):
        B.read("nextqa", annotations=ann / "nextqa/val.head150.csv", mapping=ann / "map.json")
    assert len(B.read("nextqa", annotations=ann / "nextqa/test.head150.csv")) == 150


def test_caption_readers(ann):
    ms = B.read("msrvtt_cap", annotations=ann / "captions/msrvtt_test_videodatainfo.first50videos.json")
    assert len(ms) == 50 and all(len(i.answer) == 20 for i in ms) and ms[0].video == "video7010.mp4"
    va = B.read("valor_cap", annotations=ann / "valor32k/desc_test.head150.json")
    assert len(va) == 150 and va[0].video == "CEfOX4fYlsY_20.000_30.000.mp4" and len(va[0].answer) == 1


def test_documented_formats_without_fixtures(tmp_path):
    """VATEX, MVBench and FAVDBench have no excerpt here: their documented field names."""
    (tmp_path / "vatex.json").write_text(json.dumps([{"videoID": "abc_000010_000020", "enCap": ["a man sings", "x"],
                                                      "chCap": ["一"]}]))
    v = B.read("vatex_cap", annotations=tmp_path / "vatex.json")
    assert v[0].video == "abc_000010_000020.mp4" and v[0].answer == ["a man sings", "x"]
    (tmp_path / "action_sequence.json").write_text(json.dumps(
        [{"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
          "candidates": ["Ate the medicine.", "Tidied up the blanket."], "answer": "Ate the medicine."}]))
    m = B.read("mvbench", annotations=tmp_path / "action_sequence.json")
    assert m[0].qid == "action_sequence_0" and m[0].meta["answer_index"] == 0
    (tmp_path / "favd.json").write_text(json.dumps(
        {"annotations": [{"image_id": "fa01", "caption": "a dog barks.", "id": 0},
                         {"image_id": "fa01", "caption": "a brown dog barks loudly.", "id": 1}],
         "images": [{"id": "fa01"}], "type": "captions", "info": "dummy", "licenses": "dummy"}))
    f = B.read("favdbench", annotations=tmp_path / "favd.json")
    assert f[0].video == "fa01.mp4" and f[0].answer == ["a dog barks.", "a brown dog barks loudly."]


def test_bad_annotation_names_file_and_field(tmp_path):
    p = tmp_path / "q.json"
    p.write_text(json.dumps([{"question": "what?", "id": 1, "video_id": 3}]))
    with pytest.raises(B.AnnotationError, match=r"q.json\[0\]: missing field 'answer'"):
        B.read("msrvtt_qa", annotations=p)


# ---- metrics ---------------------------------------------------------------------------------
def _items(*triples):
    return [B.EvalItem(q, "v.mp4", "?", a, meta=m) for q, a, m in triples]


def test_exact_accuracy():
    items = _items(("1", "two", {"type": "count"}), ("2", "yes", {"type": "exist"}), ("3", "left", {"type": "loc"}))
    r = M.exact_accuracy({"1": "Two.", "2": "No, it is not", "3": "It is on the left"}, items)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["by_type"] == {"count": 1.0, "exist": 0.0, "loc": 1.0}


@pytest.mark.parametrize("text,want", [("(B)", 1), ("B. tap their feet", 1), ("Answer: C", 2), ("the answer is (e)", 4),
                                       ("D", 3), ("They strum the string.", 2), ("I am not sure", None),
                                       ("Best guess", None)])
def test_extract_choice(text, want):
    assert M.extract_choice(text, ["roll the handle", "tap their feet", "strum the string", "hit with sticks", "pat"]) == want


def test_choice_accuracy_counts_unparseable():
    items = [B.EvalItem("a", "v", "q", "x", options=["x", "y"], meta={"answer_index": 0}),
             B.EvalItem("b", "v", "q", "y", options=["x", "y"], meta={"answer_index": 1})]
    r = M.choice_accuracy({"a": "(A)", "b": "no idea"}, items)
    assert r["accuracy"] == 0.5 and r["unparseable"] == 1 and r["unparseable_ids"] == ["b"]


def test_ptb_tokenize():
    assert M.ptb_tokenize("He isn't here, is he? A man's dog... runs!") == "he is n't here is he a man 's dog runs"


def test_bleu_and_cider_hand_computed():
    """One candidate, one reference: "the cat sat on the mat" vs "the cat is on the mat".
    Unigrams 5/6 match, bigrams 3/5, trigrams 1/4, 4-grams 0/3; equal lengths, no brevity penalty:
    BLEU-1 = 5/6, BLEU-2 = sqrt(5/6 * 3/5) (pycocoevalcap adds a tiny epsilon to 0 counts)."""
    items = [B.EvalItem("1", "v", "", ["The cat is on the mat."])]
    r = M.caption_scores({"1": "the cat sat on the mat"}, items, meteor=False)
    assert r["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    assert r["BLEU-3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    # CIDEr on a set: identical captions score highest; a caption sharing nothing scores 0
    items = [B.EvalItem(str(i), "v", "", [c]) for i, c in enumerate(["a dog runs in the park", "a man plays a guitar",
                                                                    "two kids swim in a pool"])]
    same = M.caption_scores({it.qid: it.answer[0] for it in items}, items, meteor=False)["CIDEr"]
    none = M.caption_scores({it.qid: "purple elephants" for it in items}, items, meteor=False)["CIDEr"]
    assert same == pytest.approx(10.0, rel=1e-6) and none == 0.0


# Sentences where the Python stand-in and Stanford's PTB tokenizer differ (numbers, times,
# abbreviations, brackets), with what pycocoevalcap's Java tokenizer gives (run here).
JAVA_PTB = {
    "At 3:30 p.m. the U.S. team scored 2,000 points (roughly).": "at 3:30 p.m. the u.s. team scored 2,000 points -lrb- roughly -rrb-",
    "A woman -- in a red dress -- sings at 10.5 km/h.": "a woman in a red dress sings at 10.5 km/h",
    "Dr. Smith's cat [left] jumps over 3 dogs.": "dr. smith 's cat -lsb- left -rsb- jumps over 3 dogs",
    "It costs $4.99, e.g. cheap!": "it costs $ 4.99 e.g. cheap",
    "Two kids can't swim in the pool.": "two kids ca n't swim in the pool",
}


def test_captions_use_pycocoevalcaps_java_tokenizer():
    if not M.java_available():
        pytest.skip("no Java here (scripts/setup.sh installs openjdk-17-jre-headless); the fallback is tested below")
    tok, name = M.tokenize_captions({str(i): [s] for i, s in enumerate(JAVA_PTB)})
    assert name == "ptb-java" and [tok[str(i)][0] for i in range(len(JAVA_PTB))] == list(JAVA_PTB.values())
    assert sum(M.ptb_tokenize(s) != t for s, t in JAVA_PTB.items()) == 4  # why the fallback is not comparable


def test_meteor_and_rouge_l():
    if not M.java_available():
        pytest.skip("METEOR needs Java")
    items = [B.EvalItem(str(i), "v", "", [c]) for i, c in enumerate(["a dog runs in the park", "a man plays a guitar",
                                                                    "two kids swim in a pool"])]
    # one call: METEOR starts Java and loads its paraphrase table (30-100 s on 2 busy cores)
    r = M.caption_scores({"0": "a dog is running in a park", "1": "a man plays guitar", "2": "children swimming"}, items)
    assert r["METEOR"] == pytest.approx(0.2709, abs=1e-3) and r["ROUGE-L"] == pytest.approx(0.4985, abs=1e-3)
    assert r["tokenizer"] == "ptb-java"


def test_without_java_the_fallback_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without java
    assert not M.java_available()
    items = [B.EvalItem("1", "v", "", ["The cat is on the mat."])]
    r = M.caption_scores({"1": "the cat sat on the mat"}, items)
    assert r["tokenizer"].startswith("python-ptb") and "not comparable" in r["tokenizer"]
    assert "METEOR" not in r and "Java" in r["METEOR_note"]
    assert r["ROUGE-L"] == pytest.approx(5 / 6)  # LCS "the cat on the mat": 5 of 6 words both ways
