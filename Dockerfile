# GPU image for cluster runs: NGC PyTorch (CUDA, NCCL, cuDNN, Apex, Transformer Engine, DALI,
# Python 3.12) plus this package with its GPU extra.
#   docker build -t nemo_avllm .          enroot import -o nemo_avllm.sqsh dockerd://nemo_avllm
#
# Base tag: pyproject asks for torch>=2.14,<2.15. NGC tags carry a pre-release of the torch that is
# released about a month later (25.09 -> 2.9.0a0, 25.12 -> 2.10.0a0, per NVIDIA's release notes), so
# torch 2.14 (released by 2026-11, 2.14.1 on PyPI) is expected in 26.09. The tag could not be checked
# from the machine this was written on (no registry access beyond PyPI/apt): the install step checks
# the image's torch against pyproject and stops naming BASE_IMAGE if it is outside the range.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.09-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ffmpeg/ffprobe: the prepare step and the CPU decoding back-end (version: the base's Ubuntu release)
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/nemo_avllm
COPY pyproject.toml README.md ./
COPY nemo_avllm ./nemo_avllm
COPY dali_pipelines ./dali_pipelines
COPY conf ./conf
COPY scripts ./scripts
COPY bench ./bench

# Keeps the image's torch, torchvision, Transformer Engine and DALI builds (pre-release versions
# such as 2.14.0a0 count as 2.14) and installs the rest of pyproject's dependencies + the gpu extra.
RUN python nemo_avllm/launch/container.py --extras gpu \
    && python -c "import nemo_avllm, torch, megatron.core; print('nemo_avllm on torch', torch.__version__)"

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["avllm"]
CMD ["--help"]
