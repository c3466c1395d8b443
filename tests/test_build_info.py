"""The installation reports what it is, and CUDA kernels are not silently dropped."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import opd_ext


def _nvcc_available():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def test_build_info_fields():
    info = opd_ext.build_info()
    assert info["opd_ext"] == opd_ext.__version__
    assert info["torch"] == torch.__version__
    assert info["cpu_threads"] == torch.get_num_threads() >= 1
    assert isinstance(info["cuda_kernels_compiled"], bool)
    assert all(a.startswith(("sm_", "compute_")) for a in info["cuda_archs"])


def test_cuda_kernels_built_when_toolkit_and_cuda_torch_exist():
    if os.environ.get("OPD_EXT_CUDA") == "0" or not torch.version.cuda or not _nvcc_available():
        pytest.skip("CUDA kernels are not expected in this build (no nvcc, CPU torch, or OPD_EXT_CUDA=0)")
    info = opd_ext.build_info()
    assert info["cuda_kernels_compiled"], "nvcc and a CUDA torch exist, yet the CUDA kernels were not built"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        assert {"sm_80", "sm_90", "compute_90"} <= set(info["cuda_archs"])


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "opd_ext", "info"], capture_output=True, text=True, check=True)
    assert "cuda_kernels_compiled" in out.stdout and torch.__version__ in out.stdout
