"""Builds the sdca._C extension: CPU kernels always, CUDA kernels when nvcc is found or FORCE_CUDA=1.

Environment: FORCE_CUDA=1 (build CUDA even when detection fails), SDCA_NO_CUDA=1 (CPU kernels only),
SDCA_NO_EXTENSION=1 (no compiled code at all; the pure-PyTorch reference is used), TORCH_CUDA_ARCH_LIST
(GPU architectures; default "8.0;9.0+PTX" when no GPU is visible at build time), MAX_JOBS (parallel compiles).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The CUDA toolkit folder. /usr/local/bin/nvcc may be a wrapper script, so its location proves little."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and \
                os.path.isfile(os.path.join(path, "bin", "nvcc")):
            return path
    return None


def _pip_cuda_includes(cuda_home):
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h), from torch's pip dependencies, and
    only when the toolkit lacks them: the pip folders also hold cuda_runtime.h and cuda_fp16.h, which must not
    shadow the toolkit's own the day the two versions drift."""
    toolkit = os.path.join(cuda_home, "include") if cuda_home else None
    if toolkit and all(os.path.isfile(os.path.join(toolkit, h)) for h in ("cublas_v2.h", "cusparse.h")):
        return []
    found = []
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted({p for p in found if glob.glob(os.path.join(p, "cublas*.h")) or
                   glob.glob(os.path.join(p, "cusparse*.h"))})


def _shared_cxx_runtime():
    """The shared C++ runtime, named by its file, for the link line (Linux with GCC).

    Without it, a toolchain that lacks the libstdc++.so link-time symlink makes the linker silently take
    libstdc++.a: the extension then carries its own copy of the iostream and locale code, which crashed
    (SIGSEGV in ostream::_M_insert<long>) the first time an error message formatted a number, in a process whose
    locale belongs to the shared runtime. Seen on a GPU machine with torch 2.11 and GCC 13.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        found = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libstdc++.so.6"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [os.path.realpath(found)] if os.path.isabs(found) and os.path.isfile(found) else []


def extension_modules():
    if _flag("SDCA_NO_EXTENSION"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # read when cpp_extension is imported
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = not _flag("SDCA_NO_CUDA") and (_flag("FORCE_CUDA") or cuda_home is not None)
    sources = (["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/*/*_autograd.cpp"))
               + sorted(glob.glob("csrc/*/cpu/*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for's OpenMP pragmas live in headers
    link = ["-fopenmp"] + _shared_cxx_runtime()
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link)
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob("csrc/*/cuda/*.cu"))
        kwargs["include_dirs"] += _pip_cuda_includes(cuda_home)
        kwargs["define_macros"] = [("WITH_CUDA", None)]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}
        ext = CUDAExtension("sdca._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension("sdca._C", sources, **kwargs)
    print(f"sdca: building the extension with {'CPU and CUDA' if with_cuda else 'CPU'} kernels", flush=True)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


modules, cmdclass = extension_modules()
setup(ext_modules=modules, cmdclass=cmdclass)
