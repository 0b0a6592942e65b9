# GPU image for cluster runs: NGC PyTorch (CUDA, NCCL, cuDNN, Apex, Transformer Engine, DALI,
# Python 3.12) plus this package with its GPU extra.
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 -t nemo_avllm .
#   enroot import -o nemo_avllm.sqsh dockerd://nemo_avllm
#
# Base image: an NGC PyTorch tag whose torch is 2.14 (pyproject: torch>=2.14,<2.15). There is no
# default, on purpose. What could be verified (NVIDIA's PyTorch release notes,
# https://docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-25-12.html):
#   25.12-py3 is based on torch 2.10.0a0+b4e4ee81d3, CUDA 13.1.0, Python 3.12 (too old for pyproject);
#   since 25.03 every image pins its Python packages in /etc/pip/constraint.txt.
# No release notes readable from the machine this was written on name a tag with torch 2.14, nor the
# Transformer Engine, DALI or megatron-core versions of any tag, so none is guessed here. Pick the
# tag whose release notes say "based on 2.14..." and pass it as BASE_IMAGE. The install step then
# checks the image itself and stops with one line, before installing anything, when its torch,
# torchvision, Transformer Engine or DALI, or a version it pins, does not fit pyproject
# (nemo_avllm/launch/container.py).
ARG BASE_IMAGE
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
# such as 2.14.0a0 count as 2.14) and every version in /etc/pip/constraint.txt; pip's resolver
# checks the whole set in a dry run first, then the rest of pyproject + the gpu extra is installed.
RUN python nemo_avllm/launch/container.py --extras gpu \
    && python -c "import nemo_avllm, torch, megatron.core; print('nemo_avllm on torch', torch.__version__)"

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["avllm"]
CMD ["--help"]
