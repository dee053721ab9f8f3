"""glmcpu: GLM-4 language models on ordinary CPUs, from the GGUF files llama.cpp uses."""
__version__ = "0.1.0"

from .errors import (ContextOverflow, ConvertError, GlmcpuError, ModelFileError,  # noqa: E402
                     UnsupportedArchitecture, UnsupportedTensorType)

__all__ = ["load", "Model", "GlmcpuError", "ModelFileError", "UnsupportedArchitecture",
           "UnsupportedTensorType", "ContextOverflow", "ConvertError"]


def __getattr__(name):
    # the engine (and the kernel choice it makes) loads on first use, so the CLI can report a
    # bad GLMCPU_KERNELS in one line
    if name in ("load", "Model", "engine", "ops"):
        import importlib
        mod = importlib.import_module(f".{'engine' if name in ('load', 'Model') else name}", __name__)
        return mod if name in ("engine", "ops") else getattr(mod, name)
    raise AttributeError(f"module 'glmcpu' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | {"engine", "ops"})
