"""Checkpoint interop: Hugging Face LLaMA/Vicuna -> megatron (`import_hf`), any dist checkpoint ->
a Hugging Face folder (`export_hf`), the encoders written in Hugging Face formats (`encoders_bridge`),
the Hugging Face model class the export loads into (`hf_model`).

Importing this package registers that class with transformers' Auto classes (`model_type: avllm`,
no `trust_remote_code`), without importing transformers (`auto_register`): after
`import nemo_avllm.hf`, `AutoModelForCausalLM.from_pretrained(exported_folder)` works. Light on
purpose: submodules import their heavy dependencies themselves."""

from nemo_avllm.hf import auto_register

auto_register.install()
