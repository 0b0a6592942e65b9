# GPU image for cluster runs: NGC PyTorch (CUDA, NCCL, Apex, Transformer Engine, Python 3.12)
# plus this package. Build: docker build -t nemo_avllm .   Run: see README (torchrun / srun).
FROM nvcr.io/nvidia/pytorch:25.09-py3

RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/nemo_avllm
COPY pyproject.toml README.md ./
COPY nemo_avllm ./nemo_avllm
COPY dali_pipelines ./dali_pipelines
COPY conf ./conf
COPY scripts ./scripts
COPY bench ./bench

# The container ships torch, Transformer Engine and Apex built for its CUDA: keep them (as
# constraints) and add the rest. Pick a base whose torch is in pyproject's range (2.14.x).
# DALI is the CUDA 12 build; use nvidia-dali-cuda130 on CUDA 13 bases.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip list --format=freeze | grep -iE '^(torch|torchvision|transformer[-_]engine.*)==' > /tmp/keep.txt; \
    pip install --no-cache-dir -c /tmp/keep.txt -e '.[test]'

ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["avllm"]
