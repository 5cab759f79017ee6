"""dpkernels: fused Triton and CUDA kernels for differentially private training.

The CUDA extension ``dpkernels._C`` (csrc/) is built only when the torch in the build
environment is a CUDA build and nvcc is found. Everywhere else the package installs as
pure Python and runs on its Triton and torch backends; ``dpkernels.backends()`` says which
are available. Without a prebuilt extension, the CUDA kernels are JIT-compiled at first
use when CUDA and nvcc exist (``dpkernels/_cuda.py``).

    pip install -e .                         # pure Python (CPU machines, CI)
    pip install --no-build-isolation -e .    # also builds the CUDA extension, if possible
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


class build_py_with_sources(build_py):
    """Also copy csrc/ into the built package as dpkernels/_csrc, so that a non-editable install
    can JIT-compile the CPU kernels (and the CUDA ones) at first use, as a checkout does."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "csrc")
        if self.editable_mode or not os.path.isdir(src):
            return  # an editable install reads the checkout's csrc/ directly
        dst = os.path.join(self.build_lib, "dpkernels", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for name in os.listdir(src):
            if name.endswith(CSRC_SUFFIXES):
                shutil.copy2(os.path.join(src, name), dst)


def cuda_extensions():
    if os.environ.get("DPKERNELS_NO_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch absent from the (isolated) build environment
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    here = HERE
    ext = CUDAExtension(
        name="dpkernels._C",
        sources=[os.path.join("csrc", "bindings.cpp"), os.path.join("csrc", "clip_sum_noise.cu")],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
cmdclass["build_py"] = build_py_with_sources

setup(
    name="dpkernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for differentially private training in PyTorch",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dpkernels", "dpkernels.*"]),
    python_requires=">=3.9",
    # torch is required but not pinned here: install the torch build you want first
    # (a range that the installed torch satisfies makes pip install nothing more).
    # ninja: torch's extension tooling builds the CPU noise kernel (csrc/philox_cpu.cpp) with it at
    # first use; without it (or a C++ compiler) the torch reference draws the same noise, slower
    install_requires=["torch>=2.4", "numpy>=1.22", "scipy>=1.8", "ninja"],
    # Real-model tests and the GPT-2 demo use Hugging Face transformers (5.18.0: newer 5.x releases
    # need a `kernels` release PyPI does not have yet) and peft. timm is NOT listed: it requires
    # torchvision, and PyPI has none for a CPU build of torch (its wheels are CUDA builds whose
    # operators fail to load beside one, and newer ones pull a newer, CUDA, torch). The README's test
    # command installs timm with --no-deps; these are the dependencies it does need.
    extras_require={
        "triton": ["triton>=3.0"],
        "demo": ["scikit-learn>=1.0", "transformers==5.18.0"],
        "test": [
            "pytest>=7",
            "scikit-learn>=1.0",
            "dp-accounting>=0.4",
            "triton>=3.0",
            "opacus>=1.5",
            "transformers==5.18.0",
            "peft==0.21.2",
            "pyyaml",
            "huggingface_hub",
            "safetensors",
            "pillow",
        ],
        "bench": ["matplotlib>=3.5", "opacus>=1.5"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
