"""Decoded batches live on one device, the decode back-end is chosen once per run, workers use
their rank's GPU, and a DALI run decodes a batch of clips in one batched call (issue 9).

A CUDA device is not available here: the `meta` device stands in for it (a tensor on another
device than the CPU), and DALI's CPU operators stand in for NVDEC (VP9/MJPEG clips)."""

from __future__ import annotations

import pytest
import torch

from nemo_avllm import media
from nemo_avllm.data import decode_pyav
from nemo_avllm.data.collate import collate_av, stack_rows
from nemo_avllm.data.conversation import TokenizedSample
from nemo_avllm.data.decode import DecodeSettings, MediaSource, load_media_batch
from nemo_avllm.data.workers import worker_gpu
from nemo_avllm.model.provider import avllm_config
from nemo_avllm.training.data import decode_settings


def test_rows_from_two_devices_are_stacked_on_one():
    cpu = torch.ones(2, 3)
    other = torch.full((2, 3), 2.0, device="meta")  # stands in for a DALI/NVDEC row on the GPU
    out = stack_rows([cpu, None, other])
    assert out.device.type == "meta" and out.shape == (3, 2, 3)
    assert stack_rows([cpu, None], device="cpu").tolist() == [[[1.0] * 3] * 2, [[0.0] * 3] * 2]
    items = [{"tokens": TokenizedSample([1, 5, 2], [-100, 5, 2]), "video": cpu, "id": "a", "modality": "V"},
             {"tokens": TokenizedSample([1, 6, 2], [-100, 6, 2]), "video": other, "id": "b", "modality": "V"}]
    assert collate_av(items, seq_length=4)["video"].device.type == "meta"
    with pytest.raises(RuntimeError):  # what collate did before: torch refuses mixed devices
        torch.stack([cpu, other])


def test_each_worker_uses_its_ranks_gpu():
    assert worker_gpu({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, count=8) == 1
    assert worker_gpu({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"}, count=8) == 2
    assert worker_gpu({}, count=8) == 0
    # SLURM binding one GPU per task (CUDA_VISIBLE_DEVICES per task): the one visible GPU
    assert worker_gpu({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"}, count=1) == 0
    with pytest.raises(RuntimeError, match="local rank 5 but this process sees 4 GPUs"):
        worker_gpu({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"}, count=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice on a machine without CUDA")
def test_backend_is_decided_once_per_run():
    assert media.resolve_backend("auto") == "cpu"  # no NVDEC here: every clip on the CPU decoder
    assert media.resolve_backend("cpu") == "cpu"
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'dali'"):
        media.resolve_backend("nvdec")
    if media.dali_available():
        assert media.resolve_backend("dali") == "dali"
        assert media.backend_label("dali") == "dali-cpu"


def test_dali_run_decodes_a_batch_in_one_call(tmp_path):
    pytest.importorskip("nvidia.dali", reason="needs nvidia-dali")
    from dali_pipelines import video as dali_video
    from tests.media_factory import FFMPEG, color_frames, make_clip, tone

    if FFMPEG is None:
        pytest.skip("needs the ffmpeg binary to make test media")
    frames = color_frames(12, 64, 48)
    paths = [make_clip(tmp_path / "a.webm", frames, vcodec="vp9", audio=tone(1.0, 48000), acodec="opus"),
             make_clip(tmp_path / "b.avi", frames[::-1].copy(), vcodec="mjpeg"),
             make_clip(tmp_path / "c.webm", frames[2:], vcodec="vp9")]
    s = DecodeSettings(num_frames=4, num_audio_segments=2, image_size=40, sample_rate=48000, window=4800, backend="dali")
    sources = [MediaSource.lookup(f"m{i}", str(p), None, None) for i, p in enumerate(paths)]
    calls = []
    run = dali_video.VideoBatchDecoder._run
    dali_video.VideoBatchDecoder._run = lambda self, enc, fr, rot: calls.append(len(enc)) or run(self, enc, fr, rot)
    try:
        got = load_media_batch(sources, s, audio=[True, False, False])
    finally:
        dali_video.VideoBatchDecoder._run = run
    assert calls == [3]  # the three videos in one pipeline run
    for src, (video, audio) in zip(sources, got):
        info = decode_pyav.probe(src.video)
        one = dali_video.decode_video_dali(src.video, media.sample_frame_indices(info.num_frames, 4), image_size=40)
        assert video.shape == (4, 3, 40, 40) and torch.allclose(video, one, atol=1e-5)
    assert got[0][1].shape == (2, 4800) and got[1][1] is None


def test_training_dataset_decodes_each_micro_batch_in_one_dali_call(tmp_path, tokenizer):
    pytest.importorskip("nvidia.dali", reason="needs nvidia-dali")
    import json

    from dali_pipelines import video as dali_video
    from nemo_avllm import config
    from nemo_avllm.data.dataset import AVDataset
    from nemo_avllm.data.manifest_checks import validate_manifest
    from nemo_avllm.model.provider import avllm_config
    from tests.media_factory import FFMPEG, color_frames, conv, make_clip, tone

    if FFMPEG is None:
        pytest.skip("needs the ffmpeg binary to make test media")
    frames = color_frames(12, 64, 64)
    for name in ("a", "b", "c"):
        make_clip(tmp_path / f"{name}.webm", frames, vcodec="vp9", audio=tone(1.0, 48000), acodec="opus")
    lines = [{"id": "v", "video": "a.webm", "conversations": conv("<VIS> What colour is the square?", "Red.")},
             {"id": "av", "video": "b.webm", "conversations": conv("<AUD_VIS> Describe it.", "A red square.")},
             {"id": "a", "video": "c.webm", "conversations": conv("<AUD> What do you hear?", "A tone.")}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, _ = validate_manifest(tmp_path / "m.jsonl")
    model_cfg = config.load_model("tiny")
    dali = AVDataset(samples, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg), "dali"))
    per_clip = AVDataset(samples, tokenizer, avllm_config(model_cfg).layout(), decode_settings(avllm_config(model_cfg), "dali"))
    calls = []
    run = dali_video.VideoBatchDecoder._run
    dali_video.VideoBatchDecoder._run = lambda self, enc, fr, rot: calls.append(len(enc)) or run(self, enc, fr, rot)
    try:
        batch = dali.__getitems__([0, 1, 2])
    finally:
        dali_video.VideoBatchDecoder._run = run
    assert calls == [2]  # the two samples that need video, in one pipeline run; audio-only needs none
    for got, want in zip(batch, (per_clip[i] for i in range(3))):
        assert got["tokens"].input_ids == want["tokens"].input_ids
        assert ("video" in got) == ("video" in want) and ("audio" in got) == ("audio" in want)
        if "video" in got:
            assert torch.allclose(got["video"], want["video"], atol=1e-5)
        if "audio" in got:
            assert torch.equal(got["audio"], want["audio"])
