"""GGUF architecture -> the module that runs it (one family per file)."""
from ..errors import UnsupportedArchitecture

FAMILIES = {"chatglm": "glm4", "glm4": "glm4", "glm4moe": "glm4_moe"}


def model_class(arch: str):
    mod = FAMILIES.get(arch)
    if mod is None:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not one glmcpu runs; supported: {', '.join(FAMILIES)}")
    import importlib
    return importlib.import_module(f"{__name__}.{mod}").Model
