"""nemo_avllm: NeMo/Megatron-style training stack for the Audio-Visual LLM.

Importing the package imports nothing else: every CLI task imports it. Loading an exported folder
with transformers' Auto classes needs `import nemo_avllm.hf` first (it registers `model_type: avllm`)."""
