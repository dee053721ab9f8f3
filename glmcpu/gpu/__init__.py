"""NVIDIA GPUs through CuPy (project issue 14): the kernels as CUDA C text (kernels.py), the offload
plan and its memory budget (plan.py, host logic only) and the kernels as functions of CuPy arrays
(ops.py, the one module that needs CuPy). Importing glmcpu or glmcpu.gpu never imports CuPy."""


def available():
    """(True, what the GPU is) when CuPy, NVRTC and an NVIDIA GPU of compute capability 6.1 or
    later (__dp4a) are all there, else (False, why, in one line). Never raises."""
    try:
        import cupy
    except Exception as e:           # ImportError, or a broken install's own error
        return False, f"CuPy is not installed ({type(e).__name__}: {e}); pip install 'glmcpu[cuda]'"
    try:
        from cupy_backends.cuda.libs import nvrtc
        major, minor = nvrtc.getVersion()
    except Exception as e:
        return False, (f"CuPy finds no NVRTC, the CUDA compiler it builds kernels with ({type(e).__name__}: {e}); "
                       "pip install 'cupy-cuda12x[ctk]'")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"no usable NVIDIA driver or GPU ({type(e).__name__}: {e})"
    if n == 0:
        return False, "no NVIDIA GPU"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        free, total = cupy.cuda.Device(0).mem_info
    except Exception as e:
        return False, f"the GPU does not answer ({type(e).__name__}: {e})"
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    cc = (props["major"], props["minor"])
    if cc < (6, 1):
        return False, f"{name} has compute capability {cc[0]}.{cc[1]}; the kernels need 6.1 or later (__dp4a)"
    return True, (f"{name}, {free / 2**30:.1f} GB free of {total / 2**30:.1f} GB, compute capability "
                  f"{cc[0]}.{cc[1]}, NVRTC {major}.{minor}")
