"""laion_clap's own code, the reference the vendored HTSAT (`nemo_avllm/model/encoders/htsat/`) is
tested against; laion-clap is a test dependency only."""

from __future__ import annotations


def laion_htsat_module():
    """laion_clap's `clap_module/htsat.py`, imported without running `laion_clap/__init__.py`, which
    downloads text tokenizers at import."""
    import importlib
    import importlib.util
    import os
    import sys
    import types

    name = "_avllm_laion_clap_module"
    if f"{name}.htsat" in sys.modules:
        return sys.modules[f"{name}.htsat"]
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or spec.origin is None:
        raise ImportError("laion-clap is not installed: pip install laion-clap==1.1.7 (the test extra)")
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "clap_module")]
    sys.modules[name] = pkg
    return importlib.import_module(f"{name}.htsat")
