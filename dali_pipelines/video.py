"""DALI video pipelines: T chosen frames → upright → short side S → centre crop → CLIP-normalised
float32 `[T, 3, S, S]`, the same contract as the CPU back-end (`nemo_avllm.media`).

On a GPU node the decode runs on NVDEC (`fn.decoders.video(device="mixed")`: H.264, HEVC, AV1,
MPEG-4, VP8, VP9, MJPEG) and rotate/resize/normalise run on the GPU. Without a GPU the same graph
runs on DALI's CPU operators, which read only VP8, VP9 and MJPEG. The frame indices
come from the caller (`sample_frame_indices` over the frame count in the prepare index), so both
back-ends pick the same frames. DALI does not apply display-matrix rotation itself; the angle from
the probe is applied with an exact nearest-neighbour `fn.rotate` before resizing.

A clip DALI cannot decode (a still image, a codec the device lacks) is decoded by PyAV with
DALI's colour conversion and resized here (`normalize_frames_dali`), so a DALI run preprocesses
every clip the same way.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from nemo_avllm.media import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_SIZE,
    MediaError,
)

VIDEO_INPUTS = ("encoded", "frames", "rotation")


def _resize_normalise(video, image_size: int):
    """Upright FHWC uint8 frames → short side S (cubic, antialiased) → centre S x S crop → CLIP
    mean/std → float32 FCHW: the contract's preprocessing, shared by both pipelines below."""
    video = fn.resize(video, resize_shorter=image_size, interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(
        video,
        crop=(image_size, image_size),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=[255.0 * m for m in CLIP_MEAN],
        std=[255.0 * s for s in CLIP_STD],
        dtype=types.FLOAT,
        output_layout="FCHW",
    )


@pipeline_def
def clip_video_pipeline(image_size: int = DEFAULT_IMAGE_SIZE, device: str = "gpu"):
    """External inputs per sample: the file's bytes, the frame indices (int32 [T]) and the
    rotation (float, counter-clockwise degrees). Output: float32 FCHW `[T, 3, S, S]`."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    rotation = fn.external_source(name="rotation", dtype=types.FLOAT, ndim=0)
    video = fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", frames=frames)
    # Multiples of 90° with nearest-neighbour are exact pixel permutations, like np.rot90.
    video = fn.rotate(video, angle=rotation, keep_size=False, interp_type=types.INTERP_NN)
    return _resize_normalise(video, image_size)


@pipeline_def
def frames_pipeline(image_size: int = DEFAULT_IMAGE_SIZE, device: str = "gpu"):
    """External input: upright uint8 frames `[T, H, W, 3]` decoded elsewhere (PyAV, DALI's
    colour conversion) for clips DALI cannot decode. Output: float32 FCHW `[T, 3, S, S]`."""
    frames = fn.external_source(name="rgb", dtype=types.UINT8, ndim=4, layout="FHWC")
    return _resize_normalise(frames.gpu() if device == "gpu" else frames, image_size)


def to_torch(tensor_list, device: str) -> torch.Tensor:
    """Dense DALI output batch → torch tensor (CUDA tensor for GPU outputs, no host copy)."""
    dense = tensor_list.as_tensor()
    if device == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device="cuda")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(dense))


def error_detail(exc: BaseException) -> str:
    """The informative line of a DALI pipeline error (what follows "encountered:")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def read_bytes(path) -> np.ndarray:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise MediaError(p, "file not found")
    return np.fromfile(p, dtype=np.uint8)


class VideoBatchDecoder:
    """A built pipeline that decodes batches of clips; reuse it (building costs ~0.1 s).

    `decode(items)` with items `(path, frame_indices, rotation)` returns `[B, T, 3, S, S]` and a
    per-item ok flag: when a batch fails, every item is retried alone so one bad file costs only
    its own row (zeros, ok=False) and the caller skips and counts it. Not thread-safe.
    """

    def __init__(
        self,
        batch_size: int,
        image_size: int = DEFAULT_IMAGE_SIZE,
        device: str = "gpu",
        num_threads: int = 2,
        device_id: int | None = None,
    ):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs a CUDA device; use device='cpu' (VP8/VP9/MJPEG only)")
        self.batch_size = batch_size
        self.image_size = image_size
        self.device = device
        self.num_threads = num_threads
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) if device == "gpu" else None
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = clip_video_pipeline(
                image_size=self.image_size,
                device=self.device,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=self.device_id,
                prefetch_queue_depth=1,  # fed one batch per run
                exec_dynamic=True,
            )
            self._pipe.build()
        return self._pipe

    def _run(self, encoded, frames, rotations) -> torch.Tensor:
        pipe = self._pipeline()
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("frames", frames)
        pipe.feed_input("rotation", rotations)
        try:
            (out,) = pipe.run()
            return to_torch(out, self.device)
        except Exception:
            self._pipe = None  # a pipeline that raised is not reused
            raise

    def decode(self, items: Sequence[tuple[str, Sequence[int], int]]) -> tuple[torch.Tensor, list[bool]]:
        if not 0 < len(items) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} items, got {len(items)}")
        lengths = {len(fi) for _, fi, _ in items}
        if len(lengths) != 1:
            raise ValueError(f"all items need the same number of frame indices, got {sorted(lengths)}")
        encoded, frames, rotations, ok = [], [], [], []
        for path, fi, rot in items:
            try:
                encoded.append(read_bytes(path))
                ok.append(True)
            except MediaError:
                encoded.append(None)
                ok.append(False)
            frames.append(np.asarray(fi, dtype=np.int32))
            rotations.append(np.float32(rot or 0))
        t = lengths.pop()
        shape = (len(items), t, 3, self.image_size, self.image_size)
        live = [i for i, good in enumerate(ok) if good]
        if live and len(live) == len(items):
            try:
                return self._run(encoded, frames, rotations), ok
            except Exception:
                pass  # find the bad item(s) below
        out = torch.zeros(shape, device="cuda" if self.device == "gpu" else "cpu")
        for i in live:
            try:
                out[i] = self._run([encoded[i]], [frames[i]], [rotations[i]])[0]
            except Exception:
                ok[i] = False
        return out, ok


_DECODERS: dict[tuple[int, str], VideoBatchDecoder] = {}


def decode_video_dali(
    path,
    frame_indices: Sequence[int],
    rotation: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    device: str = "cpu",
) -> torch.Tensor:
    """One clip through DALI → `[T, 3, S, S]` float32 (on the GPU for device="gpu").

    Raises MediaError when DALI cannot decode the file (corrupt, or a codec the device lacks).
    """
    key = (image_size, device)
    if key not in _DECODERS:
        _DECODERS[key] = VideoBatchDecoder(1, image_size=image_size, device=device)
    dec = _DECODERS[key]
    encoded = read_bytes(path)
    try:
        return dec._run([encoded], [np.asarray(frame_indices, np.int32)], [np.float32(rotation or 0)])[0]
    except RuntimeError as e:
        raise MediaError(path, f"DALI ({device}) could not decode it: {error_detail(e)}") from e


_FRAME_PIPES: dict[tuple[int, str], object] = {}


def normalize_frames_dali(frames: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE, device: str = "cpu") -> torch.Tensor:
    """Upright uint8 `[T, H, W, 3]` → `[T, 3, S, S]` float32 through DALI's resize and normalise
    (on the GPU for device="gpu"), the same operators as a clip DALI decodes itself."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    key = (image_size, device)
    if key not in _FRAME_PIPES:
        pipe = frames_pipeline(image_size=image_size, device=device, batch_size=1, num_threads=2,
                               device_id=torch.cuda.current_device() if device == "gpu" else None,
                               prefetch_queue_depth=1, exec_dynamic=True)
        pipe.build()
        _FRAME_PIPES[key] = pipe
    pipe = _FRAME_PIPES[key]
    pipe.feed_input("rgb", [np.ascontiguousarray(frames)])
    try:
        (out,) = pipe.run()
    except Exception:
        del _FRAME_PIPES[key]
        raise
    return to_torch(out, device)[0]
