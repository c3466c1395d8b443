"""Peak allocator memory of a call, on CPU or CUDA, for the tests that bound temporaries.

CPU: torch.profiler's memory events. Every tensor allocation on the CPU allocator is reported
with its size, including those made inside C++ kernels (the fused ops' outputs and any
temporaries), which a TorchDispatchMode or tracemalloc would not see; the running sum of the
events in time order is the live memory since the call started. Not seen: memory a kernel takes
outside torch's allocator (std::vector scratch) and allocations of threads other than the caller's.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile


class PeakMemory(NamedTuple):
    peak: int  # most bytes live at once during the call, above what was live before it
    retained: int  # bytes still live after it (outputs, gradients stored in .grad)


def measure_peak_memory(fn: Callable[[], object], device) -> PeakMemory:
    """Runs ``fn()`` once and reports its allocator peak on ``device`` ("cpu" or a CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return PeakMemory(
            torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before
        )
    if device.type != "cpu":
        raise ValueError(f"measure_peak_memory measures cpu or cuda, got {device}")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return PeakMemory(peak, live)
