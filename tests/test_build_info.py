"""The installation reports what it is, CUDA kernels are not silently dropped, and the binary says
which Python ABI and which torch it needs."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata

import pytest
import torch

import opd_ext
import opd_ext.testing


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
    forced_off = opd_ext.build_info()["cuda_build_mode"].upper() in ("0", "OFF")
    if forced_off or not torch.version.cuda or not _nvcc_available():
        pytest.skip("CUDA kernels are not expected in this build (no nvcc, CPU torch, or OPD_EXT_CUDA=0)")
    info = opd_ext.build_info()
    assert info["cuda_kernels_compiled"], "nvcc and a CUDA torch exist, yet the CUDA kernels were not built"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        assert {"sm_80", "sm_90", "compute_90"} <= set(info["cuda_archs"])


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "opd_ext", "info"], capture_output=True, text=True, check=True)
    assert "cuda_kernels_compiled" in out.stdout and torch.__version__ in out.stdout


def _free_threaded():
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _extension_files():
    files = [opd_ext._extension._C.__file__]
    if opd_ext.testing.simt_available():
        from opd_ext import _simt

        files.append(_simt.__file__)
    return files


@pytest.mark.skipif(_free_threaded(), reason="free-threaded CPython has no stable ABI before 3.15")
def test_extension_modules_use_the_stable_abi():
    # One binary for every CPython >= 3.10 (pyproject.toml wheel.py-api, CMakeLists.txt).
    assert opd_ext.build_info()["python_limited_api"] == "3.10"
    for path in _extension_files():
        assert os.path.basename(path).endswith(".abi3.so"), path


def test_records_the_torch_it_was_built_against():
    assert opd_ext.build_info()["torch_built_against"] == torch.__version__


def test_installed_package_requires_the_torch_it_was_built_against():
    # Only when the _C imported here is the one the installed distribution lists (not an in-place
    # build from scripts/dev_build.sh beside some other install).
    try:
        dist = metadata.distribution("opd_ext")
    except metadata.PackageNotFoundError:
        pytest.skip("opd_ext is not installed as a package")
    loaded = os.path.realpath(opd_ext._extension._C.__file__)
    if not any(os.path.realpath(dist.locate_file(f)) == loaded for f in dist.files or []):
        pytest.skip("the opd_ext._C imported here is not the installed package's")
    release = opd_ext.build_info()["torch_built_against"].split("+")[0]
    assert f"torch=={release}" in [r.replace(" ", "") for r in dist.requires or []]


def test_another_torch_release_is_refused_on_import():
    major, minor = torch.__version__.split(".")[:2]
    other = f"{major}.{int(minor) + 1}.0"
    code = f"import torch; torch.__version__ = {other!r}; import opd_ext"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert f"compiled against torch {torch.__version__}, but this is torch {other}" in out.stderr
    assert f"torch=={torch.__version__.split('+')[0]}" in out.stderr


def test_wheel_metadata_pins_the_build_torch_and_sdist_keeps_the_range():
    # The dynamic-metadata provider of pyproject.toml, called the way scikit-build-core calls it.
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("torch_requirement", root / "cmake" / "torch_requirement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = {"torch": "torch>=2.4", "dependencies": ["numpy"]}
    provider = module.TorchRequirement()
    provider.build_state("wheel")
    release = metadata.version("torch").split("+")[0]
    assert provider.dynamic_metadata(settings, {}) == {"dependencies": [f"torch=={release}", "numpy"]}
    provider.build_state("sdist")
    assert provider.dynamic_metadata(settings, {}) == {"dependencies": ["torch>=2.4", "numpy"]}
