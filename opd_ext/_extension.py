"""Loads the compiled kernels and reports how they were built."""

from __future__ import annotations

import os
import platform
import re

import torch

from opd_ext._version import __version__


def _source_checkout_note() -> str:
    """Said when the package being imported is the sources' opd_ext/ folder (e.g. `python -m
    opd_ext info` run from the repository root), which shadows an installed copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, os.pardir, "pyproject.toml")):
        return ""
    return (
        f"\nopd_ext is being imported from the source folder {here}, which shadows an installed copy: "
        "run from another directory, or install in place with `pip install --no-build-isolation -e .`"
    )


def _release(version: str) -> str:
    """ "2.14.1+cu130" -> "2.14.1", the release as the package index names it."""
    return version.split("+", 1)[0]


def _torch_pinned_by_install() -> str | None:
    """The torch release the installed opd_ext was compiled against, read from its package metadata
    (a built opd_ext requires torch==<that release>): known even when the extension cannot load."""
    from importlib import metadata

    try:
        requirements = metadata.requires("opd_ext") or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        match = re.fullmatch(r"torch\s*==\s*([^\s;,]+)", requirement.strip())
        if match:
            return match.group(1)
    return None


_REBUILD = "\n    pip install --no-build-isolation .        (-e . in a development checkout)"


def _torch_mismatch(built: str) -> str:
    return (
        f"opd_ext was compiled against torch {built}, but this is torch {torch.__version__}. A compiled "
        "extension only works with the torch release it was built against: install "
        f"torch=={_release(built)}, or rebuild opd_ext against this torch from its sources with{_REBUILD}"
    )


try:
    from opd_ext import _C  # noqa: F401  (importing registers torch.ops.opd_ext.*)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    built = _torch_pinned_by_install()
    if built is not None and _release(built) != _release(torch.__version__):
        reason = _torch_mismatch(built)
    elif torch.version.cuda is None and "cuda" in str(exc).lower():
        reason = (
            f"this opd_ext has CUDA kernels and needs a CUDA build of torch, but torch "
            f"{torch.__version__} is CPU-only. Install a CUDA torch, or rebuild opd_ext against this "
            f"one with{_REBUILD}"
        )
    else:
        reason = (
            "opd_ext's compiled extension (opd_ext._C) is missing or does not match this torch "
            f"({torch.__version__}). Rebuild it in this environment with\n"
            "    pip install --no-build-isolation -e ."
        )
    raise ImportError(f"{reason}\nOriginal error: {exc}{_source_checkout_note()}") from exc

# Loading can succeed against another torch when the symbols it uses happen to exist there, while
# the class layouts compiled into it differ: refuse another minor release outright.
_built_against = _C.build_config()["torch_version"]
if _release(_built_against).split(".")[:2] != _release(torch.__version__).split(".")[:2]:
    raise ImportError(_torch_mismatch(_built_against) + _source_checkout_note())


def build_config() -> dict:
    """How the compiled extension was built (csrc/module.cpp): torch version, CUDA kernels, archs,
    compilers; :func:`build_info` presents it."""
    return _C.build_config()


def kernel_limits() -> dict:
    """Constants of the compiled kernels that the Python layer must agree with, read from the
    headers that define them (csrc/module.cpp): ``max_streaming_topk`` (the largest k the CUDA
    kernels' streaming top-k keeps, csrc/include/opd/cuda/limits.h) and ``drift_stop_reasons``
    (name -> code of ``opd::DriftStopReason``, csrc/include/opd/drift.h)."""
    return _C.kernel_limits()


def _describe_archs(cmake_archs: str) -> list[str]:
    """CMake's "80-real,90-virtual" as nvcc names: ["sm_80", "compute_90"] (compute_* = PTX)."""
    names = []
    for arch in filter(None, cmake_archs.split(",")):
        number, _, kind = arch.partition("-")
        if kind in ("", "real"):
            names.append(f"sm_{number}")
        if kind in ("", "virtual"):
            names.append(f"compute_{number}")
    return names


def simt_available() -> bool:
    """True when this build has the SIMT emulator module (opd_ext._simt; needs Boost.Context)."""
    try:
        from opd_ext import _simt  # noqa: F401
    except ImportError:
        return False
    return True


def build_info() -> dict:
    """Versions and capabilities of this installation (also: ``python -m opd_ext info``)."""
    config = build_config()
    archs = _describe_archs(config["cuda_archs"])
    return {
        "opd_ext": __version__,
        "torch": torch.__version__,
        "torch_built_against": config["torch_version"],
        "torch_cuda": torch.version.cuda,
        "cuda_kernels_compiled": bool(config["with_cuda"]),
        "cuda_build_mode": config["cuda_mode"],
        "cuda_archs": archs,
        "nvcc": config["nvcc_version"] or None,
        "compiler": config["compiler"],
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "simt_emulator": simt_available(),
        # abi3: the same binary loads in every CPython >= this version (with the same torch).
        "python_limited_api": config.get("py_limited_api") or None,
        "extension_path": os.path.abspath(_C.__file__),
    }
