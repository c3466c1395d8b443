"""Shared benchmark harness: side-by-side timing, bandwidth against a measured ceiling, peak memory.

Every ``bench_<op>.py`` describes its sizes and implementations and hands them to :func:`main`,
which times the opd_ext kernel and its baselines (the eager PyTorch reference and
``torch.compile`` of it) in interleaved rounds of the same process, so a load spike on a shared
machine hits all of them alike and the ratios stay meaningful even when absolute times do not.

Definitions (docs/spec.md §5):
* **floor bytes**: the bytes every implementation must move at least, i.e. one read of the
  student and the teacher logits, plus one write of the logit gradient for a backward pass.
* **GB/s** = floor bytes / median time (1 GB = 1e9 bytes), for every implementation alike.
* **copy ceiling**: a large device-to-device copy (GPU) or memory-to-memory copy with all threads
  (CPU) measured in this process, counting bytes read plus bytes written.
  ``pct_of_ceiling`` = GB/s / ceiling.
* **time**: median over warm calls. GPU: CUDA events around each call, with L2 flushed before it
  (outside the timed region) so small decode shapes are not served from cache. CPU: perf_counter.
* **speedup**: ``opd_ext_speedup`` on a baseline row is the median, over rounds, of
  ``t_baseline / t_opd_ext`` measured in the same round (1.0 on the opd_ext row).
* **peak memory**: bytes allocated above what existed before the call (inputs excluded, outputs
  and temporaries included). CUDA: ``torch.cuda.max_memory_allocated``. CPU: a fresh subprocess
  per (case, implementation) resets the kernel's RSS high-water mark (``/proc/self/clear_refs``)
  after a warm-up call and reads ``VmHWM`` after one more; glibc is told to mmap every allocation
  of 64 KiB or more so freed temporaries cannot hide in already-resident heap pages.
  ``torch.compile`` is not measured there (each subprocess would recompile).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SUBJECT = "opd_ext"

# Scripts run as `python benchmarks/bench_x.py` from an in-place build (scripts/dev_build.sh) need
# the repository on the path; an installed opd_ext (pip install -e .) is used as it is.
if importlib.util.find_spec("opd_ext") is None:
    sys.path.insert(0, str(REPO_ROOT))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# --dtypes also takes torch's names (float32, bfloat16, float16, half).
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}

# Real-use sizes (docs/spec.md §5): decode steps see [B, V] rows, training steps [N, V].
DECODE_BATCHES = (1, 8, 64, 256)
TRAIN_TOKENS = (2048, 8192)
VOCABS = (32000, 151936)

CSV_FIELDS = [
    "timestamp",
    "op",
    "pass",
    "impl",
    "status",
    "device",
    "device_name",
    "dtype",
    "shape",
    "params",
    "floor_bytes",
    "time_ms",
    "time_ms_p20",
    "time_ms_p80",
    "samples",
    "gbps",
    "pct_of_ceiling",
    "ceiling_gbps",
    "opd_ext_speedup",
    "peak_mem_mb",
    "peak_mem_method",
    "torch",
    "cuda",
    "opd_ext",
    "git_commit",
    "cpu_threads",
    "load_avg_1m",
]


# ---------------------------------------------------------------------------------------------
# What a benchmark script provides
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One size/dtype point. ``shape`` is the logits shape; ``params`` are op arguments (k, ...)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    params: dict = dataclasses.field(default_factory=dict)
    pass_: str = "fwd"  # "fwd" or "fwd+bwd"

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        extra = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"{dims} {DTYPE_NAMES[self.dtype]}{extra} {self.pass_}"

    def to_json(self) -> str:
        return json.dumps(
            {"shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype], "params": self.params, "pass": self.pass_}
        )

    @staticmethod
    def from_json(text: str) -> Case:
        d = json.loads(text)
        return Case(tuple(d["shape"]), DTYPES[d["dtype"]], d["params"], d["pass"])


@dataclasses.dataclass
class Impl:
    """A timed callable; ``setup`` runs before every call outside the timed region (zero grads,
    reset a state machine)."""

    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None


@dataclasses.dataclass
class Workload:
    impls: dict[str, Impl]  # must contain SUBJECT; baselines are named "eager", "compile", ...
    floor_bytes: int


def pick_shapes(args, *, quick, cpu, cuda) -> list[tuple[int, ...]]:
    """``--shapes`` if given, else the script's set for --quick / CPU / CUDA."""
    if args.shapes:
        return args.shapes
    return quick if args.quick else cpu if args.device.type == "cpu" else cuda


def decode_shapes(args) -> list[tuple[int, ...]]:
    """[B, V] decode-step shapes: every one of docs/spec.md §5 on GPU; on CPU only B * V <= 64 * 32000,
    since the sort-based reference takes seconds per call beyond (tens of seconds on a loaded machine)."""
    return pick_shapes(
        args,
        quick=[(1, 32000), (8, 32000)],
        cpu=[(b, v) for v in VOCABS for b in DECODE_BATCHES if b * v <= 64 * 32000],
        cuda=[(b, v) for v in VOCABS for b in DECODE_BATCHES],
    )


def training_cases(args, passes: Sequence[str], params: dict | None = None) -> list[Case]:
    """[N, V] training shapes (docs/spec.md §5): every one on GPU, N=2048 on CPU (the reduced CPU
    set), one small shape with --quick."""
    shapes = pick_shapes(
        args, quick=[(128, 32000)], cpu=[(2048, v) for v in VOCABS], cuda=[(n, v) for v in VOCABS for n in TRAIN_TOKENS]
    )
    return [
        Case(shape, dtype, dict(params or {}), pass_) for pass_ in passes for dtype in args.dtypes for shape in shapes
    ]


def logit_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def random_logits(shape, dtype, device, *, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Logits drawn in place in their final dtype: no float32 staging copy that would inflate the
    subprocess memory high-water mark before the measured call."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, scale, generator=gen)


def random_tokens(shape, vocab: int, device, *, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, vocab, shape, device=device, dtype=torch.int64, generator=gen)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of a reference function, one wrapper per function so every size of a run
    shares Dynamo's cache (automatic dynamic shapes after the second size, few recompiles)."""
    return torch.compile(fn)


def baseline_impls(
    baselines: Sequence[str],
    eager_fn: Callable,
    *args,
    reference_fn: Callable | None = None,
    setup=None,
    after=None,
    **kwargs,
) -> dict[str, Impl]:
    """The requested baselines of one op, called on fixed arguments: "eager" (``eager_fn``, a
    float32 PyTorch formulation, see baselines.py), "compile" (``torch.compile`` of it) and
    "reference" (``reference_fn``, the float64 ground truth). ``after`` consumes the result
    (``Tensor.backward`` for a fwd+bwd pass)."""
    impls = {}
    for name in baselines:
        # compiled() only on request: creating the wrapper imports Dynamo, seconds per CPU subprocess.
        fn = {"eager": eager_fn, "reference": reference_fn}.get(name) if name != "compile" else compiled(eager_fn)
        if fn is None:
            continue
        if after is None:
            impls[name] = Impl(functools.partial(fn, *args, **kwargs), setup)
        else:
            impls[name] = Impl(lambda fn=fn: after(fn(*args, **kwargs)), setup)
    return impls


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD (+ "-dirty"); on a device machine the tree travels without .git, so the caller passes
    OPD_GIT_COMMIT."""
    if os.environ.get("OPD_GIT_COMMIT"):
        return os.environ["OPD_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        # Results being written are not source changes.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: torch.device) -> dict:
    import opd_ext

    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "opd_ext": opd_ext.__version__,
        "git_commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class _L2Flusher:
    """Writes a buffer larger than L2 so each timed call starts with cold caches (as Triton's
    do_bench does); decode-sized rows would otherwise be served from the 50-60 MB L2."""

    def __init__(self, device: torch.device):
        self.buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
            self.buffer = torch.empty(4 * l2, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def time_interleaved(
    impls: dict[str, Impl],
    device: torch.device,
    *,
    rounds: int,
    warmup: int,
    round_budget_s: float,
    max_inner: int = 50,
) -> dict[str, list[list[float]]]:
    """Seconds per call, as ``samples[name][round] = [t, ...]``.

    Each round calls every implementation ``inner[name]`` times in turn; ``inner`` is sized from
    the warm-up so a fast kernel gets many samples while a slow baseline runs once per round.
    """
    flush = _L2Flusher(device)
    estimate = {}
    for name, impl in impls.items():
        for _ in range(warmup):
            estimate[name] = _time_calls(impl, 1, device, flush)[0]
    per_impl_budget = round_budget_s / max(len(impls), 1)
    inner = {name: max(1, min(max_inner, int(per_impl_budget / max(t, 1e-7)))) for name, t in estimate.items()}
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        for name, impl in impls.items():
            samples[name].append(_time_calls(impl, inner[name], device, flush))
    return samples


def _time_calls(impl: Impl, n: int, device: torch.device, flush: _L2Flusher) -> list[float]:
    if device.type == "cuda":
        events = []
        for _ in range(n):
            if impl.setup:
                impl.setup()
            flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            impl.fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    times = []
    for _ in range(n):
        if impl.setup:
            impl.setup()
        t0 = time.perf_counter()
        impl.fn()
        times.append(time.perf_counter() - t0)
    return times


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def paired_speedup(baseline: list[list[float]], subject: list[list[float]]) -> float:
    """Median over rounds of (baseline round median / subject round median)."""
    return statistics.median(statistics.median(b) / statistics.median(s) for b, s in zip(baseline, subject))


@functools.cache
def copy_ceiling_gbps(device_type: str) -> float:
    """Measured copy bandwidth in GB/s, counting bytes read + bytes written."""
    device = torch.device(device_type)
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)  # well beyond L2 / the LLC
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    impl = Impl(lambda: dst.copy_(src))
    samples = time_interleaved({"copy": impl}, device, rounds=5, warmup=2, round_budget_s=0.2, max_inner=10)
    seconds = statistics.median(t for r in samples["copy"] for t in r)
    return 2 * nbytes / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------
def _cuda_peak_bytes(impl: Impl, device: torch.device) -> int:
    if impl.setup:
        impl.setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    impl.fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_peak_bytes_in_this_process(impl: Impl) -> int:
    """Child side of the CPU measurement (see the module docstring)."""
    if impl.setup:
        impl.setup()
    impl.fn()  # warm-up: one-time allocations (thread pools, oneDNN primitives) are not the op's
    if impl.setup:
        impl.setup()
    gc.collect()
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    impl.fn()
    return (_proc_status_kib("VmHWM") - before) * 1024


def _cpu_peak_bytes_subprocess(script: Path, case: Case, impl_name: str) -> int | None:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--peak-memory-child", case.to_json(), impl_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PEAK_BYTES "):
            return int(line.split()[1])
    print(
        f"    peak memory of {impl_name} not measured: child exited {proc.returncode}: "
        f"{proc.stderr.strip().splitlines()[-1:]}",
        file=sys.stderr,
    )
    return None


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def missing_ops(device: torch.device, api: Sequence[str], kernels: Sequence[str]) -> str | None:
    """Why this benchmark cannot run in this build, or None."""
    import opd_ext

    for name in api:
        obj = opd_ext
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return f"opd_ext.{name} is not in this build"
    if device.type == "cuda" and not opd_ext.cuda_kernels_available():
        return "this opd_ext build has no CUDA kernels (rebuild with nvcc, OPD_EXT_CUDA=1)"
    dispatch_key = "CUDA" if device.type == "cuda" else "CPU"
    for op in kernels:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"opd_ext::{op}", dispatch_key)
        except RuntimeError:
            has = False
        if not has:
            return f"opd_ext::{op} has no {dispatch_key} kernel in this build"
    return None


def parse_args(argv, description: str, extra_args: Callable[[argparse.ArgumentParser], None] | None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small cases, eager baseline only, no peak memory (well under a minute)",
    )
    p.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="comma list of fp32,bf16,fp16 (or torch's names: float32,bfloat16,float16)",
    )
    p.add_argument("--shapes", default=None, help="comma list of logits shapes, e.g. 8x32000,1x151936")
    p.add_argument(
        "--baselines",
        default=None,
        help="comma list among eager, compile (torch.compile of eager) and reference (the float64 "
        "ground truth, slow and memory-hungry); default eager,compile; --quick: eager",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 3)")
    p.add_argument(
        "--round-budget",
        type=float,
        default=None,
        help="seconds per round shared by the implementations (default GPU 0.2, CPU 1.0, quick 0.2)",
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure peak memory (default: on, except with --quick)",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--peak-memory-child", nargs=2, metavar=("CASE_JSON", "IMPL"), help=argparse.SUPPRESS)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    names = [
        DTYPE_ALIASES.get(d.strip().removeprefix("torch."), d.strip()) for d in args.dtypes.split(",") if d.strip()
    ]
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: unknown {', '.join(unknown)}; use fp32, bf16, fp16 (or float32, bfloat16, float16)")
    args.dtypes = [DTYPES[d] for d in names]
    if args.shapes:
        args.shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    default_baselines = "eager" if args.quick else "eager,compile"
    args.baselines = [b for b in (args.baselines or default_baselines).split(",") if b]
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.memory is None:
        args.memory = not args.quick
    if args.round_budget is None:
        args.round_budget = 0.2 if (args.quick or args.device.type == "cuda") else 1.0
    return args


def main(
    *,
    op: str,
    script: str,
    description: str,
    api: Sequence[str],
    kernels: Sequence[str],
    cases: Callable[[argparse.Namespace], list[Case]],
    build: Callable[[Case, torch.device, Sequence[str]], Workload],
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Run one op's benchmark; returns a process exit code.

    ``build(case, device, requested)`` returns the implementations for one case: SUBJECT plus
    those of the ``--baselines`` names (eager, compile, reference) it supports, or others of its
    own. ``api`` lists the opd_ext attributes and ``kernels`` the dispatcher ops the benchmark
    needs; when one is missing the run is skipped with a line saying so (exit 0), so a partial
    build still benchmarks what it has.
    """
    args = parse_args(argv, description, extra_args)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"SKIP {op}: --device cuda but no CUDA device is visible")
        return 0
    import opd_ext  # noqa: F401  (after argument parsing, so --help works without a build)

    reason = missing_ops(device, api, kernels)
    if reason:
        print(f"SKIP {op} on {device.type}: {reason}")
        return 0

    if args.peak_memory_child:
        case_json, impl_name = args.peak_memory_child
        workload = build(Case.from_json(case_json), device, [impl_name])
        print(f"PEAK_BYTES {_rss_peak_bytes_in_this_process(workload.impls[impl_name])}")
        return 0

    # Dynamo's default recompile limit (8) would silently fall back to eager after a few sizes.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    meta = run_metadata(device)
    ceiling = copy_ceiling_gbps(device.type)
    print(
        f"# {op} on {meta['device_name']} ({device.type}, {meta['cpu_threads']} CPU threads), "
        f"torch {meta['torch']}, opd_ext {meta['opd_ext']} @ {meta['git_commit']}; "
        f"copy ceiling {ceiling:.1f} GB/s (read+write); baselines: {', '.join(args.baselines)}"
    )
    suffix = "-quick" if args.quick else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / f"{op}-{device.type}{suffix}.csv"
    rows = []
    for case in cases(args):
        rows.extend(_run_case(op, case, build, device, args, meta, ceiling, Path(script)))
        write_csv(csv_path, rows)  # after every case: a run cut short by a time limit keeps its rows
    if not rows:
        print(f"SKIP {op}: no cases selected")
        return 0
    print(f"wrote {csv_path}")
    if not args.no_plot:
        png = plot_gbps(rows, args.out_dir / f"{op}-{device.type}{suffix}.png")
        if png:
            print(f"wrote {png}")
    return 0


def _run_case(op, case, build, device, args, meta, ceiling, script) -> list[dict]:
    base = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "op": op,
        "pass": case.pass_,
        "dtype": DTYPE_NAMES[case.dtype],
        "shape": "x".join(map(str, case.shape)),
        "params": " ".join(f"{k}={v}" for k, v in case.params.items()),
        **meta,
    }
    try:
        workload = build(case, device, args.baselines)
    except torch.OutOfMemoryError:
        print(f"  {case.label}: inputs do not fit in device memory, skipped")
        return []
    impls, failed = {}, {}
    for name, impl in workload.impls.items():
        try:  # the first call compiles (torch.compile) and surfaces OOM / missing kernels per impl
            if impl.setup:
                impl.setup()
            impl.fn()
            synchronize(device)
            impls[name] = impl
        except torch.OutOfMemoryError:
            failed[name] = "OOM"
        except Exception as exc:  # noqa: BLE001  (recorded in the CSV, the run goes on)
            failed[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    samples = (
        time_interleaved(impls, device, rounds=args.rounds, warmup=2, round_budget_s=args.round_budget) if impls else {}
    )
    rows = []
    for name in workload.impls:
        row = dict(
            base, impl=name, floor_bytes=workload.floor_bytes, ceiling_gbps=f"{ceiling:.1f}", load_avg_1m=load_average()
        )
        if name in failed:
            rows.append(dict(row, status=failed[name]))
            continue
        flat = [t for r in samples[name] for t in r]
        median = statistics.median(flat)
        gbps = workload.floor_bytes / median / 1e9
        row.update(
            status="ok",
            time_ms=f"{median * 1e3:.4g}",
            time_ms_p20=f"{_quantile(flat, 0.2) * 1e3:.4g}",
            time_ms_p80=f"{_quantile(flat, 0.8) * 1e3:.4g}",
            samples=len(flat),
            gbps=f"{gbps:.4g}",
            pct_of_ceiling=f"{100 * gbps / ceiling:.3g}",
        )
        if SUBJECT in samples:
            row["opd_ext_speedup"] = f"{paired_speedup(samples[name], samples[SUBJECT]):.3g}"
        rows.append(row)
    if args.memory:
        for row in rows:
            if row["status"] != "ok":
                continue
            peak, method = _peak_bytes(row["impl"], workload.impls[row["impl"]], case, device, script)
            row["peak_mem_method"] = method
            if peak is not None:
                row["peak_mem_mb"] = f"{peak / 2**20:.1f}"
    del workload, impls
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _print_case(case, rows)
    return rows


def _peak_bytes(name: str, impl: Impl, case: Case, device: torch.device, script: Path):
    if device.type == "cuda":
        return _cuda_peak_bytes(impl, device), "cuda_max_memory_allocated"
    if name == "compile":
        return None, "not measured on CPU (a fresh process would recompile)"
    if not Path("/proc/self/clear_refs").exists():
        return None, "not measured (needs Linux /proc/self/clear_refs)"
    return _cpu_peak_bytes_subprocess(script, case, name), "subprocess_rss_hwm"


def _print_case(case: Case, rows: list[dict]) -> None:
    parts = []
    for r in rows:
        if r["status"] != "ok":
            parts.append(f"{r['impl']} {r['status']}")
            continue
        text = f"{r['impl']} {r['time_ms']} ms {r['gbps']} GB/s ({r['pct_of_ceiling']}%)"
        if r["impl"] != SUBJECT and r.get("opd_ext_speedup"):
            text += f" [opd_ext {r['opd_ext_speedup']}x faster]"
        if r.get("peak_mem_mb"):
            text += f" peak {r['peak_mem_mb']} MiB"
        parts.append(text)
    print(f"  {case.label:<34} " + " | ".join(parts), flush=True)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_gbps(rows: list[dict], path: Path, ax=None) -> Path | None:
    """Grouped bars of achieved GB/s per case and implementation, with the copy ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot", file=sys.stderr)
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    labels = list(
        dict.fromkeys(f"{r['shape']} {r['dtype']}" + (f"\n{r['pass']}" if r["pass"] != "fwd" else "") for r in ok)
    )
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.2))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        values = {
            f"{r['shape']} {r['dtype']}" + (f"\n{r['pass']}" if r["pass"] != "fwd" else ""): float(r["gbps"])
            for r in ok
            if r["impl"] == impl
        }
        xs = [j + (i - (len(impls) - 1) / 2) * width for j, lab in enumerate(labels) if lab in values]
        ax.bar(xs, [values[lab] for lab in labels if lab in values], width, label=impl)
    ceiling = float(ok[0]["ceiling_gbps"])
    ax.axhline(ceiling, color="k", linestyle="--", linewidth=1, label=f"copy ceiling {ceiling:.0f} GB/s")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("GB/s over the floor bytes")
    first = ok[0]
    ax.set_title(f"{first['op']} on {first['device_name'][:40]}", fontsize=9)
    ax.legend(fontsize=7)
    if own_figure:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return path


if __name__ == "__main__":
    # `python benchmarks/harness.py [cpu|cuda]`: just the copy-bandwidth ceiling.
    _device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"copy ceiling on {device_name(torch.device(_device))} ({_device}): "
        f"{copy_ceiling_gbps(_device):.1f} GB/s (bytes read + written)"
    )
