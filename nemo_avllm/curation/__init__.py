"""GPT-assisted audio-visual instruction data (paper §3.2, Table 1): `avllm curate`.

captions.py (BLIP frame captions, CLAP audio tags, time spans) -> the shared LLM client
(`nemo_avllm.runtime.openai_client`: any OpenAI-compatible endpoint; cache, rate limit, retries,
JSON, cost) + prompts.py (versioned prompt files) ->
instructions.py (Table-1 cells, ROLE/REQUIREMENT/EXAMPLE/CONTEXT, manifest lines) -> verify.py
(MiniLM relevance, near-duplicates, LLM rubric) -> pipeline.py (the run, report, manifests).
"""
