"""Builds glmcpu's kernels once per instruction set; glmcpu.ops picks one at import.

Each variant is a one-line shim (`include "_kernels.pyx"`) compiled with its own flags, so a
wheel built on one machine runs on every machine of the LAN. Never -march=native.
"""
import glob
import os
import platform
import shutil
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

MACHINE = platform.machine().lower()
if MACHINE in ("x86_64", "amd64", "i686", "x86"):
    VARIANTS = {
        "generic": ["-DGLMCPU_SCALAR"],
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
        "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2",
                       "-mfma", "-mf16c"],
    }
elif MACHINE in ("aarch64", "arm64"):
    VARIANTS = {"generic": ["-DGLMCPU_SCALAR"], "neon": []}  # NEON is baseline on arm64
else:
    VARIANTS = {"generic": ["-DGLMCPU_SCALAR"]}
if sys.platform == "win32":
    VARIANTS = {"generic": ["/DGLMCPU_SCALAR"]}


def openmp_flags():
    """-fopenmp if this compiler has it (clang on macOS has none); the kernels run serially otherwise."""
    if os.environ.get("GLMCPU_NO_OPENMP") or sys.platform == "win32":
        return []
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    cc = new_compiler()
    customize_compiler(cc)
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        objs = cc.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
        cc.link_executable(objs, os.path.join(tmp, "omp"), extra_postargs=["-fopenmp"])
        return ["-fopenmp"]
    except Exception:
        print("glmcpu: compiler has no OpenMP; kernels will run on one thread", file=sys.stderr)
        return []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


omp = openmp_flags()
base = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-Wno-unused-function"]
extensions = [
    Extension(
        f"glmcpu._kernels_{name}",
        [f"glmcpu/_kernels_{name}.pyx"],
        include_dirs=[numpy.get_include(), "glmcpu"],
        depends=sorted(glob.glob("glmcpu/*.h")) + ["glmcpu/_kernels.pyx"],   # rebuild when they change
        extra_compile_args=base + flags + omp,
        extra_link_args=omp,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name, flags in VARIANTS.items()
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
