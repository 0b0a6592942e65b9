"""The LLM's tokenizer: a Hugging Face tokenizer folder (Vicuna's sentencepiece model), local only.

`train_sentencepiece` builds a small LLaMA-style tokenizer offline (BPE with byte fallback, the
Vicuna special tokens) for tests and the CPU demo, saved as a folder that loads like Vicuna's."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (tokenizer.model / tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {path} does not exist; point model.tokenizer at a Hugging Face tokenizer "
            f"folder (e.g. the Vicuna-7B v1.5 download) or run the demo, which trains a small one"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if tok.eos_token_id is None or tok.bos_token_id is None:
        raise ValueError(f"tokenizer {path} has no BOS/EOS token; a LLaMA/Vicuna tokenizer needs <s> and </s>")
    return tok


def train_sentencepiece(texts, out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a LLaMA-style sentencepiece tokenizer on `texts` and save it as an HF folder."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=2,
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
    return out_dir
