"""`avllm import-hf`: a Hugging Face LLaMA/Vicuna folder -> a megatron-core dist checkpoint of the LLM.

The checkpoint is the format `nemo_avllm.training.checkpoint.save` writes, with the LLM tensors
only (keys `llm.*`), saved from a TP=1/PP=1 model: dist checkpoints reshard on load, so the same
folder starts stage 1 at any TP/PP (`model.restore_from=<folder>`: every LLM tensor must be there;
projectors keep their fresh initialisation, encoders come from their own checkpoints).

Memory: the model is allocated once, empty, in the target dtype (bf16 for 7B: 12.6 GiB) and
filled one tensor at a time straight from the shards (`HFWeights`, no file left mapped); saving
writes it in place (SwiGLU fc1 whole: `common.whole_swiglu`). The peak is the model plus one
fused tensor and its parts (a layer's gate/up: 0.34 GiB for 7B), never a second copy; measured
in bench/bench_export.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from nemo_avllm.config import to_dict
from nemo_avllm.hf import llama_bridge
from nemo_avllm.hf.common import (
    DTYPE_NAMES,
    dtype_name,
    empty_model,
    single_process,
    staged_folder,
)
from nemo_avllm.model.weight_files import HFWeights
from nemo_avllm.model.llm import LLMConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _check_tokenizer(hf_dir: Path, llm: LLMConfig) -> str | None:
    """The folder's tokenizer (if any) must fit the vocabulary. Returns its path (recorded in the
    checkpoint for export-hf), or None when there is none that loads."""
    if not any((hf_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from nemo_avllm.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(hf_dir)
    except (OSError, ValueError) as e:
        log.warning("the tokenizer in %s does not load (%s); give model.tokenizer / tokenizer= yourself", hf_dir, e)
        return None
    if len(tok) > llm.vocab_size:
        raise llama_bridge.ConfigMismatchError(
            f"{hf_dir}: the tokenizer has {len(tok)} tokens but vocab_size is {llm.vocab_size}; the folder mixes two models"
        )
    return str(hf_dir)


def import_hf(hf_dir: str | Path, out: str | Path, model_cfg, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Convert `hf_dir` for the model config `model_cfg` (`conf/model/*.yaml`); returns `out`."""
    hf_dir = Path(hf_dir)
    llm = LLMConfig.from_dict(to_dict(model_cfg.llm))
    hf = llama_bridge.read_hf_config(hf_dir)
    llama_bridge.check_hf_config(hf, llm, str(hf_dir))
    weights = HFWeights(hf_dir)
    llama_bridge.check_hf_weights(weights.shape, weights.keys(), llm, str(hf_dir))
    tokenizer = _check_tokenizer(hf_dir, llm)

    cfg = OmegaConf.create(to_dict(model_cfg))
    cfg.tensor_model_parallel_size = cfg.pipeline_model_parallel_size = 1
    cfg.params_dtype = dtype_name(dtype, cfg.get("params_dtype", "fp32"))
    common_cfg = to_dict(cfg)
    common_cfg["tokenizer"] = tokenizer
    with single_process(), staged_folder(out, overwrite) as tmp:
        from nemo_avllm.model.parallel_layout import load_full_state_dict
        from nemo_avllm.training import checkpoint

        module = empty_model(cfg, llm_only=True)
        load_full_state_dict(module, llama_bridge.to_megatron(llm, weights.get, DTYPE_NAMES[cfg.params_dtype]))
        checkpoint.save(tmp, module, common={"cfg": common_cfg, "import_hf": {"source": str(hf_dir), "config": hf}})
        del module
    log.info("imported %s -> %s (%s, %s)", hf_dir, out, llm.name, cfg.params_dtype)
    return Path(out)


def run(cfg) -> Path:
    """Hydra entry point: conf/import_hf.yaml."""
    out = import_hf(cfg.hf_dir, cfg.out, cfg.model, dtype=cfg.get("dtype"), overwrite=bool(cfg.get("overwrite", False)))
    print(f"import-hf: wrote {out}; start training with model.restore_from={out}")
    return out
