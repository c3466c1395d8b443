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
from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd_ext import _extension, ops

#: Device profiles the emulator knows (SM counts and occupancy limits of these GPUs; "tiny" has
#: 2 SMs so that every fill-the-GPU decision is taken with a handful of rows).
DEVICE_PROFILES = ("h100", "h200", "a100", "l4", "tiny")
#: Thread orders: lowest runnable thread first, highest first, seeded random (also preempting at
#: atomics). A correct kernel gives bit-identical outputs under all of them.
SCHEDULES = ("forward", "reverse", "random")

# Settings of the emulator are process-wide: one emulated_cuda block configures them at a time.
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
    """True in this thread inside :func:`emulated_cuda` (and not inside a :func:`cpu_kernels` in it)."""
    return ops.runs_cuda_kernels(torch.empty(0))


def emulator_config() -> dict:
    """The emulator's current settings (device profile and its limits, schedule, seed)."""
    return dict(_module().config())


def emulator_counters() -> dict:
    """Kernel launches, blocks, threads, barriers, warp intrinsics, atomics and fiber switches so far."""
    return dict(_module().counters())


class _RouteToEmulator(TorchDispatchMode):
    """Sends every ``opd_ext::*`` op to its ``opd_ext_emu::*`` twin (same schema, emulated CUDA)
    while this thread's innermost of :func:`emulated_cuda` / :func:`cpu_kernels` is the former."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "opd_ext" and emulating():
            twin = getattr(getattr(torch.ops.opd_ext_emu, func._schema.name.split("::")[1]), func._overloadname)
            return twin(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_cuda(
    device: str = "h100",
    schedule: str = "forward",
    seed: int = 0,
    sm_count: Optional[int] = None,
    registers_per_thread: Optional[int] = None,
) -> Iterator[None]:
    """Run opd_ext's CUDA kernels on CPU tensors, in the SIMT emulator, inside this block.

    Ops called in this thread inside the block run emulated, forward and backward (call
    ``backward()`` inside the block too: autograd outside it runs the CPU kernels). The innermost
    of nested :func:`emulated_cuda` / :func:`cpu_kernels` blocks wins; settings are restored on exit.

    Args:
        device: GPU profile whose SM count and occupancy the launchers see: one of
            :data:`DEVICE_PROFILES` (case-insensitive).
        schedule: ``"forward"``, ``"reverse"`` or ``"random"`` (:data:`SCHEDULES`).
        seed: seed of the random schedule (and of the poison pattern it uses).
        sm_count: overrides the profile's SM count (e.g. to force row slicing).
        registers_per_thread: overrides the profile's assumption (64, the kernels' launch-bounds
            cap) in the occupancy answer; kernels that need fewer registers on a real GPU get more
            resident blocks there, and so may be sliced differently (see docs/simt_emulator.md).

    Raises:
        ImportError: the build has no emulator. ValueError: unknown device or schedule.
    """
    simt = _module()
    with _lock:
        saved = simt.config()
        simt.configure(
            device=device.lower(),
            schedule=schedule,
            seed=seed,
            sm_count=sm_count,
            registers_per_thread=registers_per_thread,
        )
        previous = ops.set_emulating_cuda(True)
        try:
            with _RouteToEmulator():
                yield
        finally:
            ops.set_emulating_cuda(previous)
            simt.configure(
                device=saved["device"],
                schedule=saved["schedule"],
                seed=saved["seed"],
                sm_count=saved["sm_count"],
                registers_per_thread=saved["registers_per_thread"],
            )


@contextlib.contextmanager
def cpu_kernels() -> Iterator[None]:
    """Inside :func:`emulated_cuda`: run the CPU kernels again for the duration of this block (to
    compare the emulated CUDA kernels with them in one test)."""
    previous = ops.set_emulating_cuda(False)
    try:
        yield
    finally:
        ops.set_emulating_cuda(previous)


def run_all_schedules(fn, *, device: str = "h100", random_seeds=(1, 2), sm_count: Optional[int] = None) -> dict:
    """Calls ``fn()`` under the forward, reverse and random schedules and checks that every run
    launched emulated kernels and produced bit-identical tensors.

    ``fn`` returns a tensor or a (nested) tuple / list / dict of tensors. Returns the forward run's
    tensors flattened to ``{"output": t}`` / ``{"output[0]": t0, "output[1][name]": ...}``.

    Raises:
        AssertionError: a run launched no kernel, returned no tensor, returned other outputs, or an
            output differs from the forward run (the message names the schedule, the output and
            the first differing element).
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
        label = schedule if schedule != "random" else f"random(seed={seed})"
        with emulated_cuda(device=device, schedule=schedule, seed=seed, sm_count=sm_count):
            before = emulator_counters()["launches"]
            outputs = flatten(fn())
            launched = emulator_counters()["launches"] - before
        if launched == 0:
            raise AssertionError(f"fn launched no emulated kernel under the {label} schedule: nothing was checked")
        if not outputs:
            raise AssertionError("fn returned no tensor: nothing to compare between schedules")
        results.append((label, outputs))
    _, first = results[0]
    for label, outputs in results[1:]:
        if outputs.keys() != first.keys():
            raise AssertionError(f"the {label} run returned outputs {sorted(outputs)}, the forward run {sorted(first)}")
        for name, tensor in first.items():
            other = outputs[name]
            if tensor.shape != other.shape or tensor.dtype != other.dtype:
                raise AssertionError(
                    f"{name}: {tuple(other.shape)} {other.dtype} under the {label} schedule, "
                    f"{tuple(tensor.shape)} {tensor.dtype} under forward"
                )
            a, b = tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)
            if not torch.equal(a, b):
                at = int((a != b).nonzero()[0, 0]) // max(1, tensor.element_size())
                raise AssertionError(
                    f"{name} differs between the forward and {label} schedules, first at flat index {at} "
                    f"({tensor.reshape(-1)[at].item()} vs {other.reshape(-1)[at].item()}): the kernel depends on "
                    "the order in which its threads run"
                )
    return first
