# The two commands of the README. Each does its own set-up first (scripts/setup.sh).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

# Main job: synthetic audio-visual data -> stage 1 -> stage 2 -> per-modality evaluation (tiny, CPU).
demo: setup
	.venv/bin/avllm demo

# The test suite (CPU, tiny configs of the real architectures).
test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests
