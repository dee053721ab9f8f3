"""glmcpu: GLM-4 language models on ordinary CPUs, from the GGUF files llama.cpp uses."""
__version__ = "0.1.0"

from .engine import Model, load  # noqa: E402
from .errors import (ContextOverflow, ConvertError, GlmcpuError, ModelFileError,  # noqa: E402
                     UnsupportedArchitecture, UnsupportedTensorType)

__all__ = ["load", "Model", "GlmcpuError", "ModelFileError", "UnsupportedArchitecture",
           "UnsupportedTensorType", "ContextOverflow", "ConvertError"]
