"""NVIDIA DALI pipelines for GPU nodes (NVDEC video decode, GPU resize/normalise, FLAC audio).

Same output contract as the CPU back-end in `nemo_avllm.data.media`; see `video.py` and
`audio.py`. Importing a submodule needs `nvidia-dali-cuda12x/13x`.
"""

__all__ = ["video", "audio"]
