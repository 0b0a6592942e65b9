"""Step 1 of the curation (paper §3.2): time-stamped frame captions and audio-segment captions.

- Frames: T frames sampled uniformly and decoded by the project's CPU back-end
  (`decode.read_frames_and_audio`, the same decoders, sampling and orientation as training), captioned by any
  Hugging Face image-to-text model (`AutoModelForImageTextToText` + `AutoProcessor`; BLIP by
  default), batched, on the GPU when there is one.
- Audio: the track decoded (same call) and cut into K equal segments by
  `media.segment_audio` (CLAP's window, as in training). Each segment is tagged zero-shot against
  the AudioSet label set (laion_clap's 527 classes) with CLAP: the audio embedding comes from the
  project's HTSAT encoder (`model.encoders.audio.AudioEncoder`, loaded from the HF `ClapModel`
  folder), projected by that model's audio projection; labels are embedded by its text tower.
  The tags with their probabilities are the segment's caption. With `method: seq2seq` any HF
  speech-to-text folder (e.g. a Whisper fine-tuned for audio captioning) captions each segment.

Every caption carries its time span in seconds. Results are cached per video (`VideoCache`), keyed
by the file's size and mtime and the captioning config: a rerun only captions new or changed files.
A file that cannot be decoded is reported and skipped; it never stops the run.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from nemo_avllm.curation.cache import VideoCache, digest
from nemo_avllm import media
from nemo_avllm.data import decode, decode_pyav
from nemo_avllm.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class VideoCaptions:
    """The captions of one video; `frames` and `audio` hold {"start", "end", "text"} (+ "tags")."""

    id: str
    video: str
    audio_path: str | None
    duration: float
    has_audio: bool
    frames: list[dict] = field(default_factory=list)
    audio: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoCaptions":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def resolve_device(name: str) -> str:
    """cpu, or this task's own GPU (`guard.local_gpu`: LOCAL_RANK / SLURM_LOCALID), never every
    task on cuda:0."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("captions.device=cuda but no CUDA device is visible; use auto or cpu")
        from nemo_avllm.curation.guard import local_gpu

        return f"cuda:{local_gpu()}"
    return name


def load_complete(cls, path: str, key: str, allow: bool, **kwargs):
    """`cls.from_pretrained(path)` refusing weights that leave tensors at random values (a CLAP
    folder without its text tower, a truncated download) unless `allow`."""
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                      for k in info.get("mismatched_keys") or []]
    if missing:
        what = f"{key}={path}: {len(missing)} weights are not in the folder and would stay random ({', '.join(missing[:3])}...)"
        if not allow:
            raise UserError(f"{what}; give the complete model folder, or captions.allow_incomplete_weights=true")
        log.warning("%s (captions.allow_incomplete_weights=true)", what)
    return model


def _model_path(path: str, key: str) -> str:
    """A local folder, or a hub id (then HF_HUB_OFFLINE decides whether it may download)."""
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if os.path.sep in path and not os.path.exists(path):
        raise FileNotFoundError(f"{key}={path!r} is not a folder; give the folder of a saved Hugging Face model")
    return path


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


class FrameCaptioner:
    """Any image-to-text model by folder (BLIP, GIT, ...): uint8 frames -> one caption each."""

    def __init__(self, cfg, device: str, batch_size: int, allow: bool = False):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = _model_path(str(cfg.model), "captions.frame.model")
        self.processor = AutoProcessor.from_pretrained(path)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = load_complete(AutoModelForImageTextToText, path, "captions.frame.model", allow, dtype=dtype).to(device).eval()
        self.device, self.dtype, self.batch_size = device, dtype, max(1, int(batch_size))
        self.prompt = cfg.get("prompt")
        self.max_new_tokens = int(cfg.max_new_tokens)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> list[str]:
        out: list[str] = []
        for i in range(0, len(frames), self.batch_size):
            batch = list(frames[i : i + self.batch_size])
            kwargs = {"text": [self.prompt] * len(batch)} if self.prompt else {}
            inputs = self.processor(images=batch, return_tensors="pt", **kwargs).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def audioset_labels() -> list[str]:
    """The 527 AudioSet class names in their index order, as laion_clap ships them (copied into
    conf/curation: the laion-clap package cannot be installed next to numpy 2)."""
    from nemo_avllm import config

    return load_labels(str(config.conf_dir() / "curation" / "audioset_labels.txt"))


def load_labels(spec: str) -> list[str]:
    """`audioset` or a text file with one label per line."""
    if spec == "audioset":
        return audioset_labels()
    p = Path(os.path.expanduser(spec))
    if not p.is_file():
        raise FileNotFoundError(f"captions.audio.labels={spec!r}: not 'audioset' and not a file of labels (one per line)")
    labels = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(labels) < 2:
        raise ValueError(f"captions.audio.labels file {p} has {len(labels)} labels; zero-shot tagging needs at least 2")
    return labels


def audio_encoder_config(clap_audio_config, checkpoint: str):
    """The project's `AudioEncoderConfig` for the audio tower of an HF CLAP model (inverse of
    `nemo_avllm.hf.encoders_bridge.clap_audio_config`)."""
    from nemo_avllm.model.encoders.audio import AudioEncoderConfig

    ac = clap_audio_config
    if getattr(ac, "enable_fusion", False):
        raise ValueError(f"CLAP model {checkpoint} is a fusion model; use a non-fusion one (e.g. laion/clap-htsat-unfused)")
    for name, want in (("spec_size", 256), ("window_size", 8), ("patch_size", 4)):
        if getattr(ac, name, want) != want:
            raise ValueError(f"CLAP model {checkpoint}: audio_config.{name}={getattr(ac, name)}; HTSAT here is built with {want}")
    cfg = AudioEncoderConfig(model_name="tiny", embed_dim=int(ac.patch_embeds_hidden_size), depths=tuple(ac.depths),
                             num_heads=tuple(ac.num_attention_heads), mel_bins=int(ac.num_mel_bins), checkpoint=checkpoint)
    if cfg.width != int(ac.hidden_size):
        raise ValueError(f"CLAP model {checkpoint}: audio hidden_size {ac.hidden_size} is not embed_dim * 2^(stages-1) = {cfg.width}")
    return cfg


def _pooled(out) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, 5 an output with the normalised pooler."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class AudioTagger:
    """CLAP zero-shot tagging of K segments (48 kHz, CLAP's window) against a label set."""

    sample_rate = media.SAMPLE_RATE

    def __init__(self, cfg, device: str, batch_size: int, num_segments: int, allow: bool = False):
        from transformers import AutoTokenizer, ClapModel

        from nemo_avllm.model.encoders.audio import AudioEncoder

        path = _model_path(str(cfg.model), "captions.audio.model")
        clap = load_complete(ClapModel, path, "captions.audio.model", allow).eval()
        self.encoder = AudioEncoder(audio_encoder_config(clap.config.audio_config, path)).to(device).eval()
        self.projection = clap.audio_projection.to(device).eval()
        self.scale = float(clap.logit_scale_a.exp())
        self.labels = load_labels(str(cfg.labels))
        self.top_k, self.min_prob = int(cfg.top_k), float(cfg.min_prob)
        self.device, self.batch_size, self.num_segments = device, max(1, int(batch_size)), int(num_segments)
        tok = AutoTokenizer.from_pretrained(path)
        texts = [str(cfg.label_prompt).format(label=lab) for lab in self.labels]
        clap = clap.to(device)
        embs = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                t = tok(texts[i : i + 64], padding=True, truncation=True, return_tensors="pt").to(device)
                embs.append(torch.nn.functional.normalize(_pooled(clap.get_text_features(**t)), dim=-1))
        self.text = torch.cat(embs)
        del clap  # the text tower is no longer needed

    @torch.no_grad()
    def __call__(self, wave: np.ndarray) -> list[dict]:
        """Mono 48 kHz waveform -> K {"text": "tag, tag", "tags": [(label, probability), ...]}."""
        segments = torch.from_numpy(media.segment_audio(wave, self.num_segments, media.CLAP_WINDOW))
        out = []
        for i in range(0, segments.shape[0], self.batch_size):
            x = segments[i : i + self.batch_size].to(self.device)[None]  # [1, n, W]
            emb = self.projection(self.encoder(x)[0])
            probs = (self.scale * torch.nn.functional.normalize(emb, dim=-1) @ self.text.T).softmax(-1).cpu()
            for row in probs:
                p, idx = row.topk(min(self.top_k, len(self.labels)))
                tags = [(self.labels[j], round(float(q), 4)) for q, j in zip(p, idx)]
                tags = [t for n, t in enumerate(tags) if n == 0 or t[1] >= self.min_prob]
                out.append({"text": ", ".join(t for t, _ in tags), "tags": tags})
        return out


def split_segments(wave: np.ndarray, num_segments: int) -> list[np.ndarray]:
    """K equal consecutive pieces of the track, the boundaries of `media.segment_audio`, unpadded."""
    n = wave.shape[0]
    return [wave[min(k * n // num_segments, n - 1) : max((k + 1) * n // num_segments, k * n // num_segments + 1)]
            for k in range(num_segments)]


class AudioCaptioner:
    """Any Hugging Face speech-to-text folder used as an audio captioner (e.g. a Whisper model
    fine-tuned for audio captioning): one caption per segment, at the model's sampling rate."""

    def __init__(self, cfg, device: str, batch_size: int, num_segments: int, allow: bool = False):
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        path = _model_path(str(cfg.model), "captions.audio.model")
        self.processor = AutoProcessor.from_pretrained(path)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = load_complete(AutoModelForSpeechSeq2Seq, path, "captions.audio.model", allow, dtype=dtype).to(device).eval()
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.device, self.dtype, self.batch_size = device, dtype, max(1, int(batch_size))
        self.num_segments, self.max_new_tokens = int(num_segments), int(cfg.get("max_new_tokens") or 30)

    @torch.no_grad()
    def __call__(self, wave: np.ndarray) -> list[dict]:
        pieces = split_segments(wave, self.num_segments)
        out = []
        for i in range(0, len(pieces), self.batch_size):
            x = self.processor(pieces[i : i + self.batch_size], sampling_rate=self.sample_rate, return_tensors="pt")
            feats = x["input_features"].to(self.device, self.dtype)
            ids = self.model.generate(input_features=feats, max_new_tokens=self.max_new_tokens, do_sample=False)
            out += [{"text": t.strip()} for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


AUDIO_METHODS = {"clap_zero_shot": AudioTagger, "seq2seq": AudioCaptioner}


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------


def caption_key(cfg, item) -> str:
    """What a video's captions depend on: the files (size, mtime) and the captioning config."""
    from nemo_avllm.data.index import file_stamp

    a = cfg.audio
    return digest({
        "video": [item.video, file_stamp(item.video)], "audio": [item.audio, file_stamp(item.audio)],
        "T": int(cfg.num_frames), "K": int(cfg.num_segments),
        "frame": [str(cfg.frame.model), cfg.frame.get("prompt"), int(cfg.frame.max_new_tokens)],
        "audio_model": [a.method, str(a.model), str(a.labels), a.label_prompt, int(a.top_k), float(a.min_prob),
                        a.get("max_new_tokens")],
    })


@dataclass
class _Decoded:
    item: object
    frames: np.ndarray | None = None
    spans: list[tuple[float, float]] = field(default_factory=list)
    duration: float = 0.0
    wave: np.ndarray | None = None  # mono, at the audio model's rate
    seg_spans: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None


def decode_for_captions(item, num_frames: int, num_segments: int, sample_rate: int = media.SAMPLE_RATE) -> _Decoded:
    """The project's decoding: T uniform frames (uint8, upright) and the mono track at
    `sample_rate`, with the time span of each frame and of each of the K audio segments.
    Never raises: a bad file comes back with `error`."""
    try:
        info = decode_pyav.probe(item.video)
        frames, indices, n, wave = decode.read_frames_and_audio(item.video, item.audio, num_frames, sample_rate, info)
        step = info.duration / n if info.duration > 0 else 0.0
        spans = [(round(i * step, 3), round((i + 1) * step, 3)) for i in indices]
        d = _Decoded(item, frames=frames, spans=spans, duration=info.duration)
        if wave is not None and wave.size:
            seconds = wave.size / sample_rate
            d.wave = wave
            d.seg_spans = [(round(k * seconds / num_segments, 3), round((k + 1) * seconds / num_segments, 3))
                           for k in range(num_segments)]
            d.duration = max(d.duration, seconds)
        return d
    except media.MediaError as e:
        return _Decoded(item, error=e.reason)
    except Exception as e:  # noqa: BLE001 (one file must never stop the run)
        return _Decoded(item, error=f"{type(e).__name__}: {e}")


class Captioner:
    """Frame captioner + audio tagger, built on first use (a fully cached rerun loads no model)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = resolve_device(cfg.get("device", "auto"))
        self.allow = bool(cfg.get("allow_incomplete_weights", False))
        self._frame = self._audio = None

    @property
    def frame(self) -> FrameCaptioner:
        if self._frame is None:
            self._frame = FrameCaptioner(self.cfg.frame, self.device, self.cfg.batch_size, self.allow)
        return self._frame

    @property
    def audio(self) -> "AudioTagger | AudioCaptioner":
        if self._audio is None:
            method = str(self.cfg.audio.method)
            if method not in AUDIO_METHODS:
                raise ValueError(f"captions.audio.method={method!r}; use one of {sorted(AUDIO_METHODS)}")
            self._audio = AUDIO_METHODS[method](self.cfg.audio, self.device, self.cfg.batch_size, self.cfg.num_segments,
                                                self.allow)
        return self._audio

    def caption(self, d: _Decoded) -> VideoCaptions:
        texts = self.frame(d.frames)
        vc = VideoCaptions(id=d.item.id, video=d.item.video, audio_path=d.item.audio, duration=round(d.duration, 3),
                           has_audio=d.wave is not None,
                           frames=[{"start": s, "end": e, "text": t} for (s, e), t in zip(d.spans, texts)])
        if d.wave is not None:
            for (s, e), cap in zip(d.seg_spans, self.audio(d.wave)):
                vc.audio.append({"start": s, "end": e, **cap})
        return vc


def caption_videos(items, cfg, cache_root, bad: list[dict], progress: bool = True, decode_workers: int = 2):
    """-> {media id: VideoCaptions} for every readable video of `items` (manifest.MediaItems); unreadable
    ones are appended to `bad` as {"path", "reason", "stage"}. Decoding of the next videos runs in
    threads while the models caption the current one."""
    from tqdm import tqdm

    captioner = Captioner(cfg)
    out: dict[str, VideoCaptions] = {}
    todo = []
    for item in items:
        cache = VideoCache(cache_root, item.id)
        name = None
        try:
            name = f"captions-{caption_key(cfg, item)}"
        except OSError as e:  # missing file: reported with the decode errors below
            bad.append({"path": item.video, "reason": f"cannot read ({e.strerror or e})", "stage": "captions"})
            continue
        hit = cache.get(name)
        if hit is not None:
            out[item.id] = VideoCaptions.from_dict(hit)
        else:
            todo.append((item, cache, name))
    bar = tqdm(total=len(todo), desc="captions", unit="video", disable=not progress)
    rate = media.SAMPLE_RATE
    if todo:  # models load before any decoding: a wrong folder stops the run at once
        _ = captioner.frame
        rate = captioner.audio.sample_rate  # the track is decoded at the audio model's rate
    decode = partial(decode_for_captions, num_frames=int(cfg.num_frames), num_segments=int(cfg.num_segments),
                     sample_rate=rate)
    with ThreadPoolExecutor(max(1, decode_workers)) as pool:
        window = max(2, 2 * decode_workers)
        futures = [pool.submit(decode, it) for it, _, _ in todo[:window]]
        for n, (item, cache, name) in enumerate(todo):
            d = futures[n].result()
            futures[n] = None  # free the decoded frames
            if n + window < len(todo):
                it = todo[n + window][0]
                futures.append(pool.submit(decode, it))
            bar.update(1)
            if d.error is not None:
                log.warning("curate: skipping %s: %s", item.video, d.error)
                bad.append({"path": item.video, "reason": d.error, "stage": "captions"})
                continue
            try:
                vc = captioner.caption(d)
            except Exception as e:  # noqa: BLE001 (one clip the models choke on must not stop the run)
                log.warning("curate: captioning failed for %s: %s", item.video, e)
                bad.append({"path": item.video, "reason": f"captioning: {type(e).__name__}: {e}"[:400], "stage": "captions"})
                continue
            cache.put(name, vc.to_dict())
            out[item.id] = vc
    bar.close()
    return out


def caption_lines(captions: list[dict], with_tags: bool = False) -> str:
    """One "[start-end s] text" line per caption (what the fusion prompts show the LLM)."""
    lines = []
    for c in captions:
        text = c["text"]
        if with_tags and c.get("tags"):
            text = ", ".join(f"{t} ({p:.2f})" for t, p in c["tags"])
        lines.append(f"[{c['start']:.1f}-{c['end']:.1f} s] {text}")
    return "\n".join(lines)

