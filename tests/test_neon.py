"""The NEON kernels (arm64) against their scalar twin: tools/check_neon.sh cross-compiles both into
one program, for armv8.2-a+dotprod and for plain armv8-a, and runs it under qemu-aarch64 (or natively
on an arm64 host)."""
import os
import platform
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every kernel the check compares; each build must print each of these OK
KERNELS = ["q4_0", "q4_0x4", "q8_0", "f16", "bf16", "f32", "q8_K", "attention"] + [
    name + suffix
    for name in ("q4_1", "q5_0", "q5_1", "iq4_nl", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_xs")
    for suffix in ("", " batched")] + ["q4_0 rows", "q4_0 batched", "q8_0 rows", "q8_0 batched"]
NATIVE = platform.machine() == "aarch64"                 # Linux on arm64: check_neon.sh runs natively


@pytest.mark.skipif(not NATIVE and shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="no arm64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
@pytest.mark.skipif(not NATIVE and not (shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")),
                    reason="no qemu-aarch64 to run arm64 code (apt-get install qemu-user)")
def test_neon_kernels_equal_scalar_twin():
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "check_neon.sh")], capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    builds = re.split(r"^== ", out, flags=re.M)[1:]
    assert len(builds) == 2, out                          # -march=armv8.2-a+dotprod, then armv8-a
    for build in builds:
        if "skipped" in build.splitlines()[0]:            # an arm64 host without dot products
            assert NATIVE, build
            continue
        verdicts = dict(re.findall(r"^(\S+(?: \S+)?) +(OK|FAIL)\b", build, flags=re.M))
        assert {k: verdicts.get(k) for k in KERNELS} == {k: "OK" for k in KERNELS}, build
        assert "all kernels agree" in build, build
