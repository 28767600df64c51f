"""Builds the C++ CPU kernels (csrc/) as the pybind11 module safecode_kernels._C.

The module does not link against libtorch, so it builds in seconds with any compiler that
has C++17; OpenMP is used where the compiler supports it (set SAFECODE_NO_OPENMP=1 to
build without it).
"""

import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler accepts `flag` (probe compile of an empty program)."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [compiler, flag, src, "-o", os.path.join(tmp, "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


# -ffp-contract=off: no FMA contraction, so the contrast rounds exactly as torch's does.
# -fno-trapping-math: lets GCC vectorise the NaN-aware compares (FP flags are not used).
compile_args = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden"]
link_args = []
if sys.platform != "win32":
    if not os.environ.get("SAFECODE_NO_OPENMP") and compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        compile_args.append("-fopenmp-simd")

ext = Pybind11Extension(
    "safecode_kernels._C",
    sources=["python/bindings.cpp", "csrc/step_cpu.cpp"],
    include_dirs=["csrc"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
