"""Run opd_ext's CUDA kernels without a GPU, on the SIMT emulator (csrc/simt).

The emulator compiles the exact kernel source of ``csrc/include/opd/cuda`` and the bindings of
``csrc/cuda`` as host C++ and runs every CUDA thread as a fiber, so launch shapes, row slices,
merge kernels, barriers and warp shuffles all execute as written. Inside :func:`emulated_cuda`
every ``torch.ops.opd_ext`` call on CPU tensors runs those CUDA kernels instead of the CPU ones
(forward and backward), and the Python API takes its CUDA code paths::

    import opd_ext, opd_ext.testing

    with opd_ext.testing.emulated_cuda(device="h100", schedule="random", seed=3):
        loss = opd_ext.vopd_loss(student_logits, teacher_logits, tokens)   # CPU tensors
        loss.backward()

It is a testing tool: thousands of times slower than a GPU, and what it checks is logic
(indexing, synchronisation, launch paths, numerics up to the hardware's approximate exp), not
speed. Faults it finds (a divergent ``__syncthreads``, a shuffle whose lanes exited, a deadlock,
a misaligned vector access) raise ``RuntimeError`` with "SIMT emulator fault" and the kernel's
source lines.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd_ext import _extension

#: Device profiles the emulator knows (SM counts and occupancy limits of these GPUs; "tiny" has
#: 2 SMs so that every fill-the-GPU decision is taken with a handful of rows).
DEVICE_PROFILES = ("h100", "h200", "a100", "l4", "tiny")
#: Thread orders: lowest runnable thread first, highest first, seeded random (also preempting at
#: atomics). A correct kernel gives bit-identical outputs under all of them.
SCHEDULES = ("forward", "reverse", "random")

_lock = threading.RLock()


def simt_available() -> bool:
    """True when this build has the emulator module (``opd_ext._simt``; needs Boost.Context)."""
    return _extension.simt_available()


def _module():
    try:
        from opd_ext import _simt
    except ImportError as exc:
        raise ImportError(
            "opd_ext was built without the SIMT emulator (opd_ext._simt). It needs Boost.Context "
            "(Debian: apt-get install libboost-context-dev); rebuild with "
            "`pip install --no-build-isolation -e .` (OPD_EXT_SIMT=ON makes a missing Boost an error)."
        ) from exc
    return _simt


def emulating() -> bool:
    """True inside :func:`emulated_cuda` (outside :func:`cpu_kernels`)."""
    return _extension.runs_cuda_kernels(torch.empty(0))


def emulator_config() -> dict:
    """The emulator's current settings (device profile and its limits, schedule, seed)."""
    return dict(_module().config())


def emulator_counters() -> dict:
    """Kernel launches, blocks, threads, barriers, warp intrinsics, atomics and fiber switches so far."""
    return dict(_module().counters())


_paused = 0  # > 0 inside cpu_kernels()


class _RouteToEmulator(TorchDispatchMode):
    """Sends every ``opd_ext::*`` op to its ``opd_ext_emu::*`` twin (same schema, emulated CUDA)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "opd_ext" and not _paused:
            twin = getattr(getattr(torch.ops.opd_ext_emu, func._schema.name.split("::")[1]), func._overloadname)
            return twin(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_cuda(device: str = "h100", schedule: str = "forward", seed: int = 0,
                  sm_count: Optional[int] = None) -> Iterator[None]:
    """Run opd_ext's CUDA kernels on CPU tensors, in the SIMT emulator, inside this block.

    Args:
        device: GPU profile whose SM count and occupancy the launchers see: one of
            :data:`DEVICE_PROFILES`.
        schedule: ``"forward"``, ``"reverse"`` or ``"random"`` (:data:`SCHEDULES`).
        seed: seed of the random schedule (and of the poison pattern it uses).
        sm_count: overrides the profile's SM count (e.g. to force row slicing).

    Raises:
        ImportError: the build has no emulator. ValueError: unknown device or schedule.

    Not re-entrant across threads: one emulated block at a time per process.
    """
    simt = _module()
    with _lock:
        saved = simt.config()
        simt.configure(device=device, schedule=schedule, seed=seed, sm_count=sm_count)
        previous = _extension.set_emulating_cuda(True)
        try:
            with _RouteToEmulator():
                yield
        finally:
            _extension.set_emulating_cuda(previous)
            simt.configure(device=saved["device"], schedule=saved["schedule"], seed=saved["seed"],
                           sm_count=saved["sm_count"])


@contextlib.contextmanager
def cpu_kernels() -> Iterator[None]:
    """Inside :func:`emulated_cuda`: run the CPU kernels again for the duration of this block (to
    compare the emulated CUDA kernels with them in one test)."""
    global _paused
    with _lock:
        _paused += 1
        previous = _extension.set_emulating_cuda(False)
        try:
            yield
        finally:
            _extension.set_emulating_cuda(previous)
            _paused -= 1


def run_all_schedules(fn, *, device: str = "h100", random_seeds=(1, 2), sm_count: Optional[int] = None):
    """Calls ``fn()`` under the forward, reverse and random schedules and returns the results.

    ``fn`` returns a tensor or a (nested) tuple / list / dict of tensors. Raises AssertionError
    naming the schedule and the output when any result is not bit-identical to the forward one.
    """
    def flatten(value, prefix="output"):
        if isinstance(value, torch.Tensor):
            return {prefix: value}
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (tuple, list)):
            items = enumerate(value)
        else:
            return {}
        out = {}
        for key, item in items:
            out.update(flatten(item, f"{prefix}[{key}]"))
        return out

    runs = [("forward", 0), ("reverse", 0)] + [("random", s) for s in random_seeds]
    results = []
    for schedule, seed in runs:
        with emulated_cuda(device=device, schedule=schedule, seed=seed, sm_count=sm_count):
            results.append(flatten(fn()))
    reference_name = "forward"
    for (schedule, seed), result in zip(runs[1:], results[1:]):
        for name, tensor in results[0].items():
            other = result[name]
            same = tensor.shape == other.shape and tensor.dtype == other.dtype and torch.equal(
                tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8))
            if not same:
                label = schedule if schedule != "random" else f"random(seed={seed})"
                raise AssertionError(f"{name} differs between the {reference_name} and {label} schedules: "
                                     "the kernel depends on the order in which its threads run")
    return results[0]
