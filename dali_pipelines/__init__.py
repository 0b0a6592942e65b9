"""NVIDIA DALI back-end of the decoding contract (`nemo_avllm.media`): NVDEC video decode
and GPU resize/normalise on GPU nodes, DALI's CPU operators elsewhere, FLAC/WAV/OGG audio.

Importing this package needs `nvidia-dali-cuda12x/13x`; `decode.installed("dali")` says whether
it is there. `nemo_avllm.data.decode.backend_module("dali")` is how the rest of the project reaches it.
"""

from dali_pipelines.audio import decode_audio_dali, load_audio_segments_dali
from dali_pipelines.video import decode_video_dali, normalize_frames_dali

__all__ = ["available", "decode_audio_dali", "decode_video_dali", "load_audio_segments_dali",
           "normalize_frames_dali"]


def available() -> bool:
    return True  # the imports above succeeded
