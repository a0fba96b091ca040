"""Builds rfsr_cuda._C against the torch that is installed (use `pip install --no-build-isolation .`).

CUDA kernels are compiled when this torch is a CUDA build and nvcc is found; otherwise the extension holds the CPU
kernels only, and the op still registers. Environment knobs:
  RFSR_SKIP_CUDA_BUILD=1     CPU-only build even where CUDA is available
  RFSR_CUDA_ARCHS="80;90"    compute capabilities to build for (the sm80 path runs on both)
  RFSR_KERNELS=all|reduced|a,b   compile every sm80 kernel ("all"; "all,sm90" adds the wgmma forward, the default
                             when building for 9.0), the CI set, or the kernels whose names contain a or b
  RFSR_CUTLASS_INCLUDE=DIR   CUTLASS/CuTe headers (default: the `nvidia-cutlass` package, installed with --no-deps)
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only hit when the install command is wrong
    sys.exit(
        "rfsr builds against the torch installed in this environment: install torch first, then run\n"
        "    pip install --no-build-isolation .\n"
        "(build isolation would compile against a different torch than the one you run)."
    )

CSRC = "csrc"  # setuptools wants source paths relative to this file


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cutlass_include() -> str:
    path = os.environ.get("RFSR_CUTLASS_INCLUDE")
    if not path:
        spec = importlib.util.find_spec("cutlass_library")  # located without importing its heavy dependencies
        if spec and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    if not path or not os.path.isfile(os.path.join(path, "cute", "tensor.hpp")):
        sys.exit(
            "CUDA build: CUTLASS/CuTe headers not found. Install them with `pip install --no-deps nvidia-cutlass`, "
            "or set RFSR_CUTLASS_INCLUDE to a folder holding cute/ and cutlass/, "
            "or set RFSR_SKIP_CUDA_BUILD=1 for a CPU-only build."
        )
    return path


def cuda_build_wanted() -> bool:
    if _env_flag("RFSR_SKIP_CUDA_BUILD"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def kernel_sources() -> list:
    """The instantiation files selected by RFSR_KERNELS ("all", "reduced" or name substrings); the list itself
    lives only in the generator."""
    spec = importlib.util.spec_from_file_location("rfsr_generate_instantiations",
                                                  os.path.join(CSRC, "rfbias", "generate_instantiations.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    selection = os.environ.get("RFSR_KERNELS", "").strip()
    if not selection:  # default: every sm80 kernel, plus the wgmma forward when building for 9.0
        selection = "all,sm90" if any(a.startswith("90") for a in _arch_list()) else "all"
    return [os.path.relpath(f) for f in gen.kernel_sources(selection)]


def _arch_list() -> list:
    return [a.strip().replace(".", "") for a in os.environ.get("RFSR_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
            if a.strip()]


def cuda_arch_flags() -> list:
    flags, plain = [], []
    for arch in _arch_list():
        if arch == "90":  # the wgmma kernels need the arch-specific sm_90a target (H100/H200 run it)
            arch = "90a"
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if arch.isdigit():
            plain.append(arch)
    # PTX of the lowest portable arch as well, so that newer GPUs (no SASS here) JIT the sm80 kernels instead of
    # failing with "no kernel image"; arch-specific targets (90a) have no portable PTX.
    if plain:
        low = min(plain, key=int)
        flags.append(f"-gencode=arch=compute_{low},code=compute_{low}")
    return flags


def extension():
    cxx = ["-O3"]  # the C++ standard comes from torch's extension tools
    sources = [os.path.join(CSRC, f) for f in ("rfbias_op.cpp", "layer_norm_op.cpp", "dwconv_op.cpp",
                                               "window_ops.cpp")]
    if not cuda_build_wanted():
        return cpp_extension.CppExtension("rfsr_cuda._C", sources, extra_compile_args={"cxx": cxx},
                                          include_dirs=[CSRC])
    kernels = kernel_sources()
    sources += sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + sorted(glob.glob(os.path.join(CSRC, "rfbias_cuda*.cpp")))
    sources += [os.path.join(CSRC, f) for f in ("layer_norm_cuda.cpp", "layernorm/layer_norm.cu", "dwconv_cuda.cpp",
                                                "dwconv/dwconv.cu", "window_ops_cuda.cpp",
                                                "windows/merge.cu", "windows/partition.cu",
                                                "rfbias/scale_factor.cu")]
    sources += kernels
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-DNDEBUG",
            "-Xfatbin", "-compress-all"] + cuda_arch_flags()
    nvcc_threads = os.environ.get("NVCC_THREADS")
    if nvcc_threads:
        nvcc.append(f"--threads={nvcc_threads}")
    # Extra nvcc flags for kernel experiments, e.g. RFSR_NVCC_FLAGS="-DRFSR_BWD_MIN_BLOCKS=3".
    nvcc += os.environ.get("RFSR_NVCC_FLAGS", "").split()
    # RFSR_WITH_CUDA_BWD: the fused backward binding registers for CUDA (it falls back to the ATen backward for
    # cases no compiled kernel takes), so rfbias_op.cpp leaves its CUDA backward registration out.
    defines = ["RFSR_WITH_CUDA", "RFSR_WITH_CUDA_BWD"]
    return cpp_extension.CUDAExtension(
        "rfsr_cuda._C",
        sources,
        include_dirs=[CSRC, cutlass_include()],
        define_macros=[(d, None) for d in defines],
        extra_compile_args={"cxx": cxx + [f"-D{d}" for d in defines], "nvcc": nvcc},
    )


setup(
    packages=find_packages(include=["rfsr_cuda", "rfsr_cuda.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
