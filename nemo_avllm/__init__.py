"""nemo_avllm: NeMo/Megatron-style training stack for the Audio-Visual LLM.

Importing the package registers the exported Hugging Face model (`model_type: avllm`) with
transformers' Auto classes without importing transformers (`nemo_avllm.hf.auto_register`)."""

from nemo_avllm.hf import auto_register as _auto_register

_auto_register.install()
