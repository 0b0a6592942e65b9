"""Why the demo's randomly initialised encoders are hard to learn from, measured without training.

1. Audio: HTSAT segment embeddings of silence (room noise) and of the demo's four tones: norms,
   cosine similarities and distances. A silent and a sounding segment end up close: the pooled
   output is mostly a shared direction (LayerNorm'd patch tokens, small random residual branches,
   average pooling), the tone moving it by ~10 %.
2. Linear probes (4-fold logistic regression, L2, C=1) on the frozen features of rendered demo
   clips: motion from the visual tokens, sound timing from audio segment 0, on the raw features
   and on per-dimension standardised ones (what `projector_init=feature_stats` starts from).

Prints one line per measurement:

    audio seed=0 silence~quiet-low cos=0.994 dist=1.27 norm=11.3
    probe seed=0 task=motion features=raw acc=0.86

Usage: python bench/probe_demo_features.py [--seeds 0 1] [--clips 160] [--model tiny_demo]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--clips", type=int, default=160)
    ap.add_argument("--model", default="tiny_demo")
    args = ap.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from nemo_avllm import config
    from nemo_avllm.media import normalize_frames, segment_audio
    from nemo_avllm.demo import clips as S
    from nemo_avllm.model.encoders import AudioEncoder, VisionEncoder
    from nemo_avllm.model.provider import avllm_config

    torch.set_num_threads(1)
    clip_rate, rate = 16000, 48000  # the demo renders at 16 kHz; the encoder reads 48 kHz
    rng = random.Random(1)
    specs = [S.draw_spec(i, rng, p_no_audio=0) for i in range(args.clips)]
    for seed in args.seeds:
        cfg = avllm_config(config.load_model(args.model, [f"vision.init_seed={seed}", f"audio.init_seed={seed}"]))
        t_frames, k = cfg.num_frames, cfg.num_audio_segments
        venc, aenc = VisionEncoder(cfg.vision), AudioEncoder(cfg.audio)

        # 1. silence vs tones, one 1-s segment each (repeat-padded to the CLAP window)
        t = np.arange(rate) / rate
        noise = np.random.default_rng(0).standard_normal(rate) * 0.002
        waves = {"silence": noise}
        for loud, amp in S.LOUDNESS.items():
            for pitch, hz in S.PITCHES.items():
                waves[f"{loud}-{pitch}"] = amp * np.sin(2 * np.pi * hz * t) + noise
        segs = torch.from_numpy(np.stack([segment_audio(w.astype(np.float32), 1, cfg.audio.clip_samples)[0]
                                          for w in waves.values()]))
        emb = aenc(segs[None])[0]
        names = list(waves)
        for j in range(1, len(names)):
            cos = float(torch.nn.functional.cosine_similarity(emb[0], emb[j], dim=0))
            print(f"audio seed={seed} silence~{names[j]} cos={cos:.4f} dist={float((emb[0] - emb[j]).norm()):.2f} "
                  f"norm={float(emb[0].norm()):.1f}", flush=True)
        d = [float((emb[a] - emb[b]).norm()) for a in range(1, len(names)) for b in range(a + 1, len(names))]
        print(f"audio seed={seed} between-tones dist_min={min(d):.2f} dist_max={max(d):.2f}", flush=True)

        # 2. linear probes on rendered clips
        vis, aud = [], []
        idx = np.round(np.linspace(0, 15, t_frames)).astype(int)
        for i, s in enumerate(specs):
            e_t, e_s = venc(normalize_frames(S.render_frames(s, 96, 16)[idx], cfg.vision.geometry()["image_size"])[None])
            vis.append(torch.cat([e_t[0].flatten(), e_s[0].mean(0)]).numpy())
            wave = np.repeat(S.render_audio(s, 2.0, clip_rate, i), rate // clip_rate)
            aud.append(aenc(torch.from_numpy(segment_audio(wave, k, cfg.audio.clip_samples))[None])[0, 0].numpy())
        vis, aud = np.stack(vis), np.stack(aud)
        spread, offset = float(aud.std(0).mean()), float(np.abs(aud.mean(0)).mean())
        print(f"audio seed={seed} segment0 per-dim spread={spread:.3f} |mean|={offset:.3f}", flush=True)
        for task, x, y in (("motion", vis, [s.motion for s in specs]),
                           ("sound_timing", aud, [s.sound_late for s in specs])):
            for name, z in (("raw", x), ("standardised", _standardise(x))):
                acc = cross_val_score(LogisticRegression(max_iter=3000, C=1.0), z, y, cv=4).mean()
                print(f"probe seed={seed} task={task} features={name} acc={acc:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
