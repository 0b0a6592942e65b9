"""Register the Hugging Face classes with transformers' Auto classes, at no import cost.

`import nemo_avllm.hf` (which calls `install`) must stay light (the export and import tasks
import it; importing transformers takes seconds), yet after it `AutoConfig` / `AutoModelForCausalLM` / `AutoModel.from_pretrained` must
know `model_type: avllm`, with no `trust_remote_code`. So registration waits for transformers: if
its Auto modules are imported already it happens at once, otherwise an import hook runs it right
after each is first imported. The model is registered through a stand-in that imports the real
class on first use, because transformers imports `modeling_auto` while its own modeling modules
may still be half-imported.
"""

from __future__ import annotations

import sys
import warnings

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
MODEL_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel")


def _register_config(module) -> None:
    from nemo_avllm.hf.hf_config import AVLLMConfig

    module.AutoConfig.register(AVLLMConfig.model_type, AVLLMConfig, exist_ok=True)


class DeferredAVLLM:
    """Stands in for `AVLLMForConditionalGeneration` in the Auto mappings; what it returns are
    instances of the real class."""

    config_class = None  # set at registration

    @staticmethod
    def real():
        from nemo_avllm.hf.hf_model import AVLLMForConditionalGeneration

        return AVLLMForConditionalGeneration

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls.real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls.real()._from_config(config, **kwargs)


def _register_models(module) -> None:
    from nemo_avllm.hf.hf_config import AVLLMConfig

    DeferredAVLLM.config_class = AVLLMConfig
    for name in MODEL_AUTO_CLASSES:
        getattr(module, name).register(AVLLMConfig, DeferredAVLLM, exist_ok=True)


_ACTIONS = {_CONFIG_AUTO: _register_config, _MODELING_AUTO: _register_models}


def _run(name: str, module) -> None:
    try:
        _ACTIONS[name](module)
    except Exception as e:  # noqa: BLE001 - never break importing transformers
        warnings.warn(f"nemo_avllm could not register its Hugging Face classes with transformers: {e!r}", stacklevel=2)


class _Loader:
    """Wraps a module's loader to run the registration after the module has executed (duck-typed,
    as importlib allows: importing importlib.abc would cost more than the rest of the package)."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._name, module)

    def __getattr__(self, attr):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, attr)


class _AfterImport:
    """A meta path finder that only wraps the loaders of the two Auto modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _ACTIONS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Register now for the Auto modules already imported; hook the others (idempotent)."""
    pending = False
    for name in _ACTIONS:
        if name in sys.modules:
            _run(name, sys.modules[name])
        else:
            pending = True
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
