"""Checkpoint interop: Hugging Face LLaMA/Vicuna -> megatron (`import_hf`), any dist checkpoint ->
a Hugging Face folder (`export_hf`), the encoders written in Hugging Face formats (`encoders_bridge`), the
Hugging Face model class the export loads into (`hf_model`). Light on purpose: submodules import
their heavy dependencies themselves."""
