"""Static GPU cost report of the CUDA kernels: registers, spills, shared memory and the SASS of the
streaming loops, turned into issue-rate and bandwidth bounds for an H100 SXM and an H200. Needs
nvcc and cuobjdump, no GPU.

    python benchmarks/gpu_cost_report.py                       # writes benchmarks/results/gpu_cost_sm90.{md,json}
    python benchmarks/gpu_cost_report.py --out DIR --arch 90 --force

What it does:

1. Configures the project with CMake (the build's own flags, `compile_commands.json`; CUDA forced
   on, architecture sm_<arch> only) in `build/gpu_cost_report/`, and compiles every
   `csrc/cuda/*.cu` with that exact nvcc command, changed from `-c ... -o x.o` to
   `-cubin -o x.cubin` plus `-Xptxas -v`. Files are compiled one after the other; a cubin is
   reused while the command, nvcc and every file under `csrc/` that it may include are unchanged.
2. Parses the `ptxas -v` log (registers, stack, spill stores/loads, shared memory, barriers) of
   every kernel (`__global__` instantiation) and disassembles the cubin with `cuobjdump -sass`.
3. Finds each kernel's streaming loop and the instructions it issues per element (see
   `find_loops` / `hot_path`), and the element rate that implies against the HBM floor.

These are static estimates: the kernels have not yet been run on a GPU for this report.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ---- machine model -------------------------------------------------------------------------------

SCHEDULERS_PER_SM = 4  # warp schedulers (SM sub-partitions); each issues <= 1 warp instruction / clock
WARP_LANES = 32
MUFU_LANES_PER_SM = 16  # MUFU (ex2, rcp, lg2, ...) results per clock per SM on sm_90

GPUS = {
    # name: SMs, assumed sustained SM clock (GHz), HBM bandwidth (TB/s, the copy-bandwidth floor)
    "H100 SXM": {"sms": 132, "clock_ghz": 1.755, "hbm_tbps": 3.35},
    "H200": {"sms": 132, "clock_ghz": 1.755, "hbm_tbps": 4.8},
}

DTYPES = {  # C++ spelling in demangled names -> (short name, bytes)
    "c10::BFloat16": ("bf16", 2),
    "c10::Half": ("fp16", 2),
    "__nv_bfloat16": ("bf16", 2),
    "__half": ("fp16", 2),
    "float": ("fp32", 4),
    "double": ("fp64", 8),
}
# The order the bindings dispatch logit pairs in (single-dtype kernels: fp32, bf16, fp16).
DTYPE_ORDER = ["fp32/fp32", "bf16/bf16", "fp16/fp16", "bf16/fp32", "fp16/fp32", "fp32", "bf16", "fp16"]

# Files under csrc/ that a .cu may include: any change recompiles.
HEADER_GLOBS = ("csrc/**/*.h", "csrc/**/*.hpp", "csrc/**/*.cuh", "csrc/**/*.inl")


class ReportError(RuntimeError):
    """A missing tool or a failed step, with a message meant for the user."""


# ---- ptxas -v ------------------------------------------------------------------------------------

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers")
_USED_FIELDS = {
    "barriers": re.compile(r"used (\d+) barriers"),
    "cumulative_stack": re.compile(r"(\d+) bytes cumulative stack size"),
    "smem": re.compile(r"(\d+) bytes smem"),
    "cmem0": re.compile(r"(\d+) bytes cmem\[0\]"),
    "lmem": re.compile(r"(\d+) bytes lmem"),
}


def parse_ptxas(text: str) -> dict[str, dict]:
    """Resource usage per entry function (mangled name) from `nvcc -Xptxas -v` output.

    Each entry gets registers, stack_frame, spill_stores, spill_loads, barriers, smem,
    cumulative_stack, cmem0 (0 where ptxas omits a field) and `callees`: the stack frame / spill
    line of the non-inlined device functions listed under it."""
    kernels: dict[str, dict] = {}
    current: dict | None = None
    props_for: str | None = None
    for line in text.splitlines():
        if m := _ENTRY_RE.search(line):
            current = kernels.setdefault(
                m.group(1),
                {
                    "arch": m.group(2),
                    "registers": None,
                    "stack_frame": 0,
                    "spill_stores": 0,
                    "spill_loads": 0,
                    "barriers": 0,
                    "smem": 0,
                    "cumulative_stack": 0,
                    "cmem0": 0,
                    "lmem": 0,
                    "callees": {},
                },
            )
            current["_name"] = m.group(1)
            props_for = None
        elif m := _PROPS_RE.search(line):
            props_for = m.group(1)
        elif (m := _FRAME_RE.search(line)) and current is not None and props_for is not None:
            frame = {"stack_frame": int(m.group(1)), "spill_stores": int(m.group(2)), "spill_loads": int(m.group(3))}
            if props_for == current["_name"]:
                current.update(frame)
            else:
                current["callees"][props_for] = frame
            props_for = None
        elif (m := _USED_RE.search(line)) and current is not None:
            current["registers"] = int(m.group(1))
            for key, regex in _USED_FIELDS.items():
                if f := regex.search(line):
                    current[key] = int(f.group(1))
    for record in kernels.values():
        record.pop("_name", None)
    return kernels


# ---- SASS ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instr:
    addr: int
    guard: str  # "" or e.g. "@!P0"
    opcode: str  # e.g. "LDG.E.EF.128"
    operands: str
    text: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def conditional(self) -> bool:
        """Guarded by a predicate that can be false (or, for BRA, a predicate operand)."""
        if self.guard and self.guard not in ("@PT", "@UPT"):
            return True
        return self.base == "BRA" and re.match(r"\s*!?U?P[0-9T]\s*,", self.operands) is not None

    @property
    def target(self) -> int | None:
        """Branch target address of BRA / JMP / CALL (None for register targets)."""
        if self.base not in ("BRA", "JMP", "CALL"):
            return None
        m = re.search(r"(0x[0-9a-fA-F]+)\s*$", self.operands)
        return int(m.group(1), 16) if m else None


_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_GUARD_RE = re.compile(r"^(@!?U?P[0-9T])\s+(.*)$")

_LOAD_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16, "256": 32}


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """Instructions per function (mangled name) from `cuobjdump -sass` output."""
    functions: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        if m := _FUNC_RE.match(line):
            current = functions.setdefault(m.group(1), [])
            continue
        if current is None or not (m := _INSTR_RE.match(line)):
            continue
        body = m.group(2)
        guard = ""
        if g := _GUARD_RE.match(body):
            guard, body = g.group(1), g.group(2)
        opcode, _, operands = body.partition(" ")
        current.append(Instr(int(m.group(1), 16), guard, opcode, operands.strip(), m.group(2)))
    return functions


def access_bytes(opcode: str) -> int:
    """Bytes per thread moved by a memory instruction (LDG.E.128 -> 16, LDG.E.U16 -> 2, LDG.E -> 4)."""
    for part in opcode.split(".")[1:]:
        if part in _LOAD_WIDTHS:
            return _LOAD_WIDTHS[part]
    return 4


def is_global_load(ins: Instr) -> bool:
    return ins.base == "LDG"


def is_global_store(ins: Instr) -> bool:
    return ins.base in ("STG", "RED", "ATOMG")


def _falls_through(ins: Instr) -> bool:
    if ins.base in ("EXIT", "RET", "BRX", "JMX", "JMP") or (ins.base == "BRA"):
        return ins.conditional
    return True


@dataclasses.dataclass
class Loop:
    head: int  # address of the first instruction (the back-edges' target)
    tail: int  # address of the last back-edge branch to head
    first: int  # index of head in the function's instruction list
    last: int  # index of tail

    def contains(self, other: Loop) -> bool:
        inside = self.first <= other.first and other.last <= self.last
        return inside and (self.first, self.last) != (other.first, other.last)


def find_loops(instrs: list[Instr], min_load_bytes: int = 8) -> list[Loop]:
    """Innermost loops that stream global memory with vector loads.

    A loop is the address range [t, b] of back-edges: branches at b to a target t <= b (several
    back-edges to one t make one loop, ending at the last). A loop streams when its range holds
    an LDG of at least `min_load_bytes` per thread (64/128-bit vector loads: the library's
    streaming bodies load 16-byte chunks; merges and gathers load scalars). Of nested streaming
    loops only the innermost are kept."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    tails: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        t = ins.target
        if ins.base == "BRA" and t is not None and t < ins.addr and t in index:
            tails[t] = max(tails.get(t, -1), i)
    loops = []
    for head, last in tails.items():
        first = index[head]
        if any(is_global_load(x) and access_bytes(x.opcode) >= min_load_bytes for x in instrs[first : last + 1]):
            loops.append(Loop(head, instrs[last].addr, first, last))
    inner = [lp for lp in loops if not any(lp.contains(o) for o in loops)]
    return sorted(inner, key=lambda lp: lp.head)


@dataclasses.dataclass
class LoopPath:
    instructions: list[Instr]  # the hot path, head to back-edge, in address order
    range_instructions: int  # every instruction in [head, tail]

    @property
    def load_bytes(self) -> int:
        return sum(access_bytes(x.opcode) for x in self.instructions if is_global_load(x))

    @property
    def store_bytes(self) -> int:
        return sum(access_bytes(x.opcode) for x in self.instructions if is_global_store(x))

    def count(self, predicate) -> int:
        return sum(1 for x in self.instructions if predicate(x))

    def opcodes(self, predicate) -> str:
        counts: dict[str, int] = {}
        for x in self.instructions:
            if predicate(x):
                counts[x.opcode] = counts.get(x.opcode, 0) + 1
        return " + ".join(f"{n}×{op}" for op, n in counts.items())


def hot_path(instrs: list[Instr], loop: Loop) -> LoopPath:
    """The loop's hot path: of the paths from the head to a back-edge that stay inside the loop's
    range (forward edges only; inner loops are walked once), the one that executes the most
    global-load bytes and, among those, the fewest instructions.

    Conditional blocks that load nothing (re-centring calls, NaN re-dos, top-k appends and
    compactions, barriers' slow paths) are thereby assumed not taken: a lower bound on the common
    iteration. The count of every instruction in the range is reported beside it."""
    first, last = loop.first, loop.last
    addr_index = {instrs[i].addr: i for i in range(first, last + 1)}
    # best[i] = (load bytes, -instructions) of the best path from the head reaching i (inclusive).
    best: list[tuple[int, int] | None] = [None] * (last + 1 - first)
    prev: list[int | None] = [None] * (last + 1 - first)
    best[0] = (access_bytes(instrs[first].opcode) if is_global_load(instrs[first]) else 0, -1)
    end: tuple[tuple[int, int], int] | None = None

    def relax(src: int, dst: int) -> None:
        ins = instrs[dst]
        score = (
            best[src - first][0] + (access_bytes(ins.opcode) if is_global_load(ins) else 0),
            best[src - first][1] - 1,
        )
        if best[dst - first] is None or score > best[dst - first]:
            best[dst - first] = score
            prev[dst - first] = src

    for i in range(first, last + 1):
        if best[i - first] is None:
            continue
        ins = instrs[i]
        t = ins.target
        if ins.base == "BRA" and t is not None:
            if t == loop.head:
                if end is None or best[i - first] > end[0]:
                    end = (best[i - first], i)
            elif t > ins.addr and t in addr_index:
                relax(i, addr_index[t])
        if _falls_through(ins) and i + 1 <= last:
            relax(i, i + 1)
    if end is None:
        raise ValueError(f"no path from 0x{loop.head:x} back to it")
    path, i = [], end[1]
    while i is not None:
        path.append(instrs[i])
        i = prev[i - first]
    return LoopPath(path[::-1], last + 1 - first)


# ---- names -----------------------------------------------------------------------------------------


def demangle(names: list[str], tool: str) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    demangled = out.splitlines()
    if len(demangled) != len(names):
        raise ReportError(f"{tool} returned {len(demangled)} names for {len(names)}")
    return dict(zip(names, demangled))


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def kernel_name(demangled: str) -> tuple[str, list[str]]:
    """(short name, dtypes) of a demangled kernel. The short name keeps the innermost namespace of
    the function (kernels of different files share names such as `slices_kernel`), drops the
    return type, the parameters and the namespaces inside the template arguments, and shortens the
    dtypes; the dtypes are the floating-point template arguments, in order:
    "void opd::cuda::token_stats_impl::row_stats_kernel<opd::cuda::token_stats_impl::PairStats<
    c10::BFloat16, float> >(...)" -> ("token_stats_impl::row_stats_kernel<PairStats<bf16, fp32>>",
    ["bf16", "fp32"])."""
    s = demangled.replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[5:]
    # Cut the parameter list (the first '(' outside template brackets) and split off the template.
    depth, cut, angle = 0, len(s), None
    for i, ch in enumerate(s):
        if ch == "<":
            if depth == 0 and angle is None:
                angle = i
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    s = s[:cut].strip()
    function, args = (s[:angle], s[angle:]) if angle is not None and angle < cut else (s, "")
    function = "::".join(function.split("::")[-2:])
    args = re.sub(r"\b(?:[A-Za-z_]\w*::)+(?=[A-Za-z_])", lambda m: "c10::" if m.group(0) == "c10::" else "", args)
    spelled = re.findall(r"c10::BFloat16|c10::Half|__nv_bfloat16|__half|\bfloat\b|\bdouble\b", args)
    dtypes = [DTYPES[t][0] for t in spelled]
    for cpp, (short, _) in DTYPES.items():
        args = re.sub(rf"(?<![\w:]){re.escape(cpp)}\b", short, args)
    args = re.sub(r"\s+>", ">", args)
    return function + args, dtypes


def dtype_bytes(dtypes: list[str]) -> int:
    sizes = {short: size for short, size in DTYPES.values()}
    return sum(sizes[d] for d in dtypes)


# ---- analysis ------------------------------------------------------------------------------------


def analyse_loop(instrs: list[Instr], loop: Loop, dtypes: list[str]) -> dict:
    path = hot_path(instrs, loop)
    n = len(path.instructions)
    read_per_element = dtype_bytes(dtypes)
    result = {
        "range": [f"0x{loop.head:04x}", f"0x{loop.tail:04x}"],
        "path_instructions": n,
        "range_instructions": path.range_instructions,
        "load_bytes": path.load_bytes,
        "store_bytes": path.store_bytes,
        "loads": path.opcodes(is_global_load),
        "stores": path.opcodes(is_global_store),
        "mufu": path.count(lambda x: x.base == "MUFU"),
        "calls": path.count(lambda x: x.base == "CALL"),
        "barriers": path.count(lambda x: x.base == "BAR"),
        "local_memory_in_range": sum(1 for x in instrs[loop.first : loop.last + 1] if x.base in ("LDL", "STL")),
        "local_memory_on_path": path.count(lambda x: x.base in ("LDL", "STL")),
        "elements": None,
        "note": "",
    }
    if not read_per_element:
        result["note"] = "no floating-point template argument: elements unknown"
    elif path.load_bytes % read_per_element:
        result["note"] = f"{path.load_bytes} load bytes are not a multiple of {read_per_element} per element"
    else:
        elements = path.load_bytes // read_per_element
        result["elements"] = elements
        result["instructions_per_element"] = n / elements
        result["range_instructions_per_element"] = path.range_instructions / elements
        result["mufu_per_element"] = result["mufu"] / elements
        result["bytes_read_per_element"] = read_per_element
        result["bytes_written_per_element"] = path.store_bytes / elements
        result["bytes_per_element"] = read_per_element + path.store_bytes / elements
    return result


def bounds(loop: dict) -> dict:
    """Element rates (elements/s) an H100 SXM / H200 could sustain for this loop, per bound."""
    out = {}
    ipe, mpe, bpe = loop["instructions_per_element"], loop["mufu_per_element"], loop["bytes_per_element"]
    for gpu, g in GPUS.items():
        clock = g["clock_ghz"] * 1e9
        rates = {
            "issue": g["sms"] * SCHEDULERS_PER_SM * clock * WARP_LANES / ipe,
            "memory": g["hbm_tbps"] * 1e12 / bpe,
        }
        if mpe:
            rates["mufu"] = g["sms"] * MUFU_LANES_PER_SM * clock / mpe
        bound = min(rates, key=rates.get)
        out[gpu] = {
            "rates": rates,
            "bound": bound,
            "rate": rates[bound],
            "fraction_of_floor": rates[bound] / rates["memory"],
            "issue_use_at_floor": rates["memory"] / rates["issue"],
        }
    return out


def analyse(ptxas: dict[str, dict], sass: dict[str, list[Instr]], names: dict[str, str], source: str) -> list[dict]:
    kernels = []
    for mangled in sorted(set(ptxas) | set(sass)):
        short, dtypes = kernel_name(names.get(mangled, mangled))
        record = {
            "kernel": short,
            "dtypes": "/".join(dtypes),
            "source": source,
            "mangled": mangled,
            "demangled": names.get(mangled, mangled),
            "resources": ptxas.get(mangled),
            "loops": [],
            "hot_loops": [],
        }
        instrs = sass.get(mangled, [])
        record["sass_instructions"] = len(instrs)
        record["local_memory_instructions"] = sum(1 for x in instrs if x.base in ("LDL", "STL"))
        for loop in find_loops(instrs):
            try:
                record["loops"].append(analyse_loop(instrs, loop, dtypes))
            except ValueError as e:
                record["loops"].append({"range": [f"0x{loop.head:04x}", f"0x{loop.tail:04x}"], "note": str(e)})
        loaded = [lp for lp in record["loops"] if lp.get("load_bytes")]
        if loaded:
            most = max(lp["load_bytes"] for lp in loaded)
            record["hot_loops"] = [i for i, lp in enumerate(record["loops"]) if lp.get("load_bytes") == most]
            for i in record["hot_loops"]:
                if record["loops"][i].get("elements"):
                    record["loops"][i]["bounds"] = bounds(record["loops"][i])
        kernels.append(record)
    return kernels


def generic_name(kernel: str) -> str:
    """The kernel without its dtypes: "row_stats_kernel<PairStats<bf16, fp32>>" -> "row_stats_kernel<PairStats>"."""
    s = re.sub(r"\b(?:bf16|fp16|fp32|fp64)\b(?:,\s*)?", "", kernel)
    while "<>" in s:
        s = s.replace("<>", "")
    return s


def _sort_key(k: dict) -> tuple:
    order = DTYPE_ORDER.index(k["dtypes"]) if k["dtypes"] in DTYPE_ORDER else len(DTYPE_ORDER)
    return k["source"], generic_name(k["kernel"]), order, k["kernel"]


# ---- tools and compilation -------------------------------------------------------------------------


def _candidates(tool: str, env_var: str | None) -> list[str]:
    found = []
    if env_var and os.environ.get(env_var):
        found.append(os.environ[env_var])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            found.append(os.path.join(os.environ[var], "bin", tool))
    if which := shutil.which(tool):
        found.append(which)
    found.append(f"/usr/local/cuda/bin/{tool}")
    return found


def find_tool(tool: str, env_var: str | None = None, extra: tuple[str, ...] = ()) -> str | None:
    if env_var and os.environ.get(env_var) and not os.access(os.environ[env_var], os.X_OK):
        raise ReportError(f"{env_var}={os.environ[env_var]} is not an executable {tool}")
    for path in [*_candidates(tool, env_var), *extra]:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _triton_bin(tool: str) -> tuple[str, ...]:
    """Triton wheels bundle cuobjdump / nvdisasm: a fallback for partial CUDA toolkits."""
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return ()
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(os.path.join(p, "backends", "nvidia", "bin", tool) for p in spec.submodule_search_locations)


def find_tools() -> dict[str, str]:
    nvcc = find_tool("nvcc", "CUDACXX")
    if nvcc is None:
        raise ReportError(
            "nvcc not found: install the CUDA toolkit or set CUDACXX / CUDA_HOME "
            "(searched CUDACXX, CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin)"
        )
    cuobjdump = find_tool(
        "cuobjdump", "CUOBJDUMP", (os.path.join(os.path.dirname(nvcc), "cuobjdump"), *_triton_bin("cuobjdump"))
    )
    if cuobjdump is None:
        raise ReportError(
            "cuobjdump not found: install the CUDA toolkit's cuobjdump (e.g. the "
            "cuda-cuobjdump package) or set CUOBJDUMP=/path/to/cuobjdump (a triton wheel's "
            "triton/backends/nvidia/bin/cuobjdump also works)"
        )
    demangler = find_tool("cu++filt", None, (os.path.join(os.path.dirname(nvcc), "cu++filt"),)) or shutil.which(
        "c++filt"
    )
    if demangler is None:
        raise ReportError("neither cu++filt (CUDA toolkit) nor c++filt (binutils) found to demangle kernel names")
    # $CMAKE, else the interpreter's own cmake (pip's, as the pip build uses: the project needs a
    # CMake that knows CUDA 20), else PATH.
    venv_cmake = os.path.join(os.path.dirname(sys.executable), "cmake")
    cmake = os.environ.get("CMAKE") or (venv_cmake if os.access(venv_cmake, os.X_OK) else shutil.which("cmake"))
    if cmake is None:
        raise ReportError("cmake not found (pip install cmake): the report compiles with the build's own flags")
    return {"nvcc": nvcc, "cuobjdump": cuobjdump, "demangler": demangler, "cmake": cmake}


def tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    for ln in lines:
        if m := re.search(r"release ([\d.]+), V([\d.]+)", ln):
            return f"{m.group(2)}"
    return lines[-1] if lines else "?"


def configure(tools: dict[str, str], build: Path, arch: str) -> dict[str, dict]:
    """CMake configure (CUDA on, sm_<arch> only); returns compile_commands.json entries by source."""
    build.mkdir(parents=True, exist_ok=True)
    cmd = [
        tools["cmake"],
        "-S",
        str(REPO),
        "-B",
        str(build),
        "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        "-DOPD_EXT_BUILD_TESTS=OFF",
        "-DOPD_EXT_SIMT=OFF",
        "--no-warn-unused-cli",
        f"-DCMAKE_CUDA_ARCHITECTURES={arch}-real",
        f"-DCMAKE_CUDA_COMPILER={tools['nvcc']}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    if shutil.which("ninja"):
        if not (build / "CMakeCache.txt").exists() or "Ninja" in (build / "CMakeCache.txt").read_text():
            cmd += ["-G", "Ninja"]
    env = dict(os.environ, OPD_EXT_CUDA="1")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    print(f"configuring with CMake in {build} (sm_{arch}) ...", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise ReportError(
            "CMake configure failed (torch must import in this interpreter):\n" + (p.stdout + p.stderr)[-4000:]
        )
    entries = json.loads((build / "compile_commands.json").read_text())
    return {os.path.realpath(e["file"]): e for e in entries}


def cubin_command(entry: dict, cubin: Path) -> list[str]:
    args = entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])
    out, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        if a in ("-MD", "-MMD"):
            continue
        if a in ("-MT", "-MF", "-o"):
            skip = 1
            continue
        out.append("-cubin" if a == "-c" else a)
    if "-cubin" not in out:
        raise ReportError(f"unexpected compile command (no -c): {entry.get('command')}")
    return [out[0], "-Xptxas", "-v", *out[1:], "-o", str(cubin)]


def _inputs_digest(cmd: list[str], source: Path, nvcc_version: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cmd[:-2]).encode())
    h.update(nvcc_version.encode())
    files = {source.resolve()}
    for pattern in HEADER_GLOBS:
        files.update(Path(p).resolve() for p in glob.glob(str(REPO / pattern), recursive=True))
    for path in sorted(files):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def compile_source(
    entry: dict, source: Path, cache: Path, nvcc_version: str, force: bool, label: str
) -> tuple[Path, str]:
    """(cubin, ptxas log) of one .cu, compiled or reused from the cache."""
    stem = source.stem
    probe = cubin_command(entry, cache / "x.cubin")
    key = _inputs_digest(probe, source, nvcc_version)
    cubin, log = cache / f"{stem}-{key}.cubin", cache / f"{stem}-{key}.ptxas.txt"
    if cubin.exists() and log.exists() and not force:
        print(f"{label} {source.relative_to(REPO)}: unchanged, reusing {cubin.name}", flush=True)
        return cubin, log.read_text()
    for old in cache.glob(f"{stem}-*"):
        old.unlink()
    cmd = cubin_command(entry, cubin)
    print(f"{label} {source.relative_to(REPO)}: compiling (nvcc -cubin -Xptxas -v) ...", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=entry.get("directory", str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    next_note = 30.0
    while proc.poll() is None:
        time.sleep(0.5)
        if (elapsed := time.monotonic() - start) >= next_note:
            print(f"    ... still compiling {source.name} ({elapsed:.0f} s)", flush=True)
            next_note += 30.0
    reader.join()
    text = "".join(output)
    if proc.returncode != 0:
        raise ReportError(
            f"nvcc failed on {source.relative_to(REPO)} (exit {proc.returncode}):\n{shlex.join(cmd)}\n{text[-6000:]}"
        )
    log.write_text(text)
    print(f"    done in {time.monotonic() - start:.0f} s", flush=True)
    return cubin, text


def disassemble(cuobjdump: str, cubin: Path) -> str:
    sass = cubin.with_suffix(".sass")
    if sass.exists() and sass.stat().st_mtime >= cubin.stat().st_mtime:
        return sass.read_text()
    p = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True)
    if p.returncode != 0:
        raise ReportError(f"cuobjdump -sass {cubin} failed:\n{p.stderr[-3000:]}")
    sass.write_text(p.stdout)
    return p.stdout


def source_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    # What the CUDA compilation reads: the bindings, the headers they include, the build.
    paths = ("csrc/cuda", "csrc/include", ":(glob)csrc/*.h", "CMakeLists.txt", "cmake")
    return {
        "commit": git("log", "-1", "--format=%h", "--", *paths),
        "dirty": bool(git("status", "--porcelain", "--", *paths)),
    }


# ---- report ------------------------------------------------------------------------------------------


def _fmt_rate(r: float) -> str:
    return f"{r / 1e9:,.0f}"


def _hot_loop_rows(kernels: list[dict]) -> list[tuple[dict, dict, str]]:
    rows = []
    for k in kernels:
        hot = k["hot_loops"]
        for n, i in enumerate(hot):
            tag = f" ({chr(ord('A') + n)})" if len(hot) > 1 else ""
            rows.append((k, k["loops"][i], tag))
    return rows


def markdown(report: dict) -> str:
    arch = report["arch"]
    kernels = report["kernels"]
    g = GPUS
    lines = [
        f"# GPU cost report, sm_{arch} (static: not yet run on a GPU)",
        "",
        f"Generated by `python benchmarks/gpu_cost_report.py` from `csrc/cuda/*.cu` at commit "
        f"{report['sources']['commit']}{' + local changes' if report['sources']['dirty'] else ''}, "
        f"nvcc {report['tools']['nvcc_version']}, cuobjdump {report['tools']['cuobjdump_version']}, "
        f"with the CMake build's flags for sm_{arch}. Machine-readable: `gpu_cost_sm{arch}.json`.",
        "",
        "These numbers are **static estimates** from the compiler output; none of them has been measured on a GPU.",
        "",
        "## Method and assumptions",
        "",
        "* **Resources** from `ptxas -v`: registers per thread, local-memory spill stores / loads "
        "(bytes per thread), static shared memory per block.",
        "* **Hot loop** (SASS, `cuobjdump -sass`): a loop is the address range from a back-edge's target "
        "to the last branch back to it (a `BRA` to a lower address); a *streaming* loop is one whose "
        "range holds a global vector load (`LDG` of 64 or 128 bits); of nested streaming loops the "
        "innermost is kept, and of a kernel's streaming loops those with the most load bytes per "
        "iteration are its hot loops (several when one kernel has variants, e.g. with and without "
        "token statistics: A, B in address order). The **path** counted is the one from the loop head "
        "to its back-edge that issues the most global-load bytes and, among those, the fewest "
        "instructions: rarely taken branches that load nothing (re-centring calls, NaN re-dos, top-k "
        "appends and compactions) are assumed not taken. `range` gives every instruction between head "
        "and back-edge (an upper bound); the addresses let a reader find the loop in "
        "`cuobjdump -sass`.",
        "* **Elements per iteration** = the path's LDG bytes / the bytes of one element of each row the "
        "kernel reads (the floating-point template arguments: `<bf16, fp32>` reads 2 + 4 bytes per "
        "element pair). For two-row kernels an element is a (student, teacher) pair. Bytes per element "
        "= those reads + the path's STG bytes per element (the gradient of the backwards).",
        f"* **Issue bound**: elements/s = SMs × {SCHEDULERS_PER_SM} schedulers × clock × {WARP_LANES} lanes "
        "/ (instructions per element), assuming one warp instruction per scheduler per clock, all 32 "
        "lanes useful and no stall other than issue (no memory latency, barrier or dependency stalls). "
        f"**MUFU bound**: SMs × {MUFU_LANES_PER_SM} MUFU results per clock × clock / (MUFU per element). "
        "**Memory floor**: HBM bandwidth / bytes per element. The bound is the smallest of the three; "
        "`% of floor` = that rate / the memory floor; `issue at floor` = the share of issue slots the "
        "loop needs to run at the memory floor (> 100 %: issue-bound).",
        "* GPUs: "
        + "; ".join(f"{name}: {v['sms']} SMs, {v['clock_ghz']} GHz, {v['hbm_tbps']} TB/s HBM" for name, v in g.items())
        + ". Rates in G elements/s.",
        "* Not modelled: the scalar head/tail of a row, reductions, merges and launch overhead (they "
        "matter for short rows), L2 effects, occupancy limits on latency hiding.",
        "",
        "## Hot loops and implied throughput",
        "",
    ]
    gpu_names = list(g)
    header = [
        "kernel",
        "dtypes",
        "regs",
        "spill st/ld (B)",
        "loop (SASS)",
        "instr/iter (range)",
        "elem/iter",
        "instr/elem",
        "MUFU/elem",
        "B/elem",
    ]
    for name in gpu_names:
        header += [f"{name}: bound, % of floor", f"{name} G elem/s", f"{name} issue at floor"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, lp, tag in _hot_loop_rows(kernels):
        r = k["resources"] or {}
        cells = [
            f"`{k['kernel']}`{tag}",
            k["dtypes"] or "-",
            str(r.get("registers", "?")),
            f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}",
            f"{lp['range'][0]}–{lp['range'][1]}",
        ]
        if lp.get("elements"):
            cells += [
                f"{lp['path_instructions']} ({lp['range_instructions']})",
                str(lp["elements"]),
                f"{lp['instructions_per_element']:.1f}",
                f"{lp['mufu_per_element']:.2f}",
                f"{lp['bytes_per_element']:g}",
            ]
            for name in gpu_names:
                b = lp["bounds"][name]
                cells += [
                    f"{b['bound']} {100 * b['fraction_of_floor']:.0f} %",
                    _fmt_rate(b["rate"]),
                    f"{100 * b['issue_use_at_floor']:.0f} %",
                ]
        else:
            cells += [f"{lp.get('path_instructions', '?')} ({lp.get('range_instructions', '?')})", "?", "?", "?", "?"]
            cells += ["?"] * (3 * len(gpu_names))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Loads and stores on each hot path (per thread and iteration):", ""]
    lines += [
        "| kernel | dtypes | loop | LDG | STG | CALL | BAR | local memory (range) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, lp, tag in _hot_loop_rows(kernels):
        lines.append(
            f"| `{k['kernel']}`{tag} | {k['dtypes'] or '-'} | {lp['range'][0]}–{lp['range'][1]} | "
            f"{lp.get('loads', '')} | {lp.get('stores') or '-'} | {lp.get('calls', 0)} | "
            f"{lp.get('barriers', 0)} | {lp.get('local_memory_in_range', 0)} |"
        )

    lines += [
        "",
        "## Resources of every kernel (ptxas -v)",
        "",
        "| kernel | dtypes | source | registers | stack (B) | spill stores (B) | spill loads (B) | smem (B) "
        "| barriers | LDL/STL in SASS | hot loop instr/elem |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        r = k["resources"] or {}
        ipe = [k["loops"][i].get("instructions_per_element") for i in k["hot_loops"]]
        ipe_txt = " / ".join(f"{x:.1f}" for x in ipe if x is not None) or "— (no vector streaming loop)"
        lines.append(
            f"| `{k['kernel']}` | {k['dtypes'] or '-'} | {Path(k['source']).name} | "
            f"{r.get('registers', '?')} | "
            f"{r.get('stack_frame', '?')} | {r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} | "
            f"{r.get('smem', '?')} | {r.get('barriers', '?')} | {k['local_memory_instructions']} | "
            f"{ipe_txt} |"
        )
    lines += ["", "## Findings", ""] + [f"* {f}" for f in findings(report)] + [""]
    return "\n".join(lines)


def _grouped(items: list[tuple[dict, dict, str]], detail) -> str:
    """`kernel<·>` (tag): dtype detail, dtype detail; ... for a compact list of hot loops."""
    groups: dict[str, list[str]] = {}
    for k, lp, tag in items:
        groups.setdefault(f"`{generic_name(k['kernel'])}`{tag}", []).append(f"{k['dtypes']} {detail(lp)}")
    return "; ".join(f"{name}: {', '.join(v)}" for name, v in groups.items())


def findings(report: dict) -> list[str]:
    out = []
    kernels = report["kernels"]
    rows = _hot_loop_rows(kernels)
    spilled = [
        k for k in kernels if (k["resources"] or {}).get("spill_stores") or (k["resources"] or {}).get("spill_loads")
    ]
    if spilled:
        out.append(
            "Spills (stores/loads, bytes per thread): "
            + ", ".join(
                f"`{k['kernel']}` {k['resources']['spill_stores']}/{k['resources']['spill_loads']}" for k in spilled
            )
            + "."
        )
    else:
        out.append("No kernel spills.")
    hot_local = [(k, lp, tag) for k, lp, tag in rows if lp.get("local_memory_in_range")]
    if hot_local:
        out.append(
            "Local-memory instructions (LDL/STL) inside a hot loop: "
            + _grouped(
                hot_local,
                lambda lp: f"{lp['local_memory_in_range']} in range, {lp['local_memory_on_path']} on the path",
            )
            + "."
        )
    elif spilled:
        out.append("No hot loop has an LDL/STL in its range: the spills are outside the streaming loops.")
    if any(tag for _, _, tag in rows):
        out.append(
            "(A), (B): one kernel with several streaming loops of equal loads per iteration, e.g. a "
            "runtime choice between two per-element visitors; MUFU/elem tells them apart."
        )
    for gpu in GPUS:
        slow = [(k, lp, tag) for k, lp, tag in rows if lp.get("bounds") and lp["bounds"][gpu]["bound"] != "memory"]
        if slow:
            out.append(
                f"Not memory-bound on the {gpu} (bound, % of the floor): "
                + _grouped(
                    slow,
                    lambda lp, gpu=gpu: (
                        f"{lp['bounds'][gpu]['bound']} {100 * lp['bounds'][gpu]['fraction_of_floor']:.0f} %"
                    ),
                )
                + "."
            )
        else:
            out.append(f"Every hot loop is memory-bound on the {gpu} under these assumptions.")
    tight = [
        (k, lp, tag)
        for k, lp, tag in rows
        if lp.get("bounds")
        and all(b["bound"] == "memory" for b in lp["bounds"].values())
        and max(b["issue_use_at_floor"] for b in lp["bounds"].values()) > 0.7
    ]
    if tight:
        out.append(
            "Memory-bound, but needing > 70 % of the issue slots at the H200 floor (little headroom "
            "for stalls): "
            + _grouped(tight, lambda lp: f"{100 * max(b['issue_use_at_floor'] for b in lp['bounds'].values()):.0f} %")
            + "."
        )
    missing = list(dict.fromkeys(generic_name(k["kernel"]) for k in kernels if not k["hot_loops"]))
    if missing:
        out.append(
            "No vector streaming loop (merges, scans: resources only): " + ", ".join(f"`{m}`" for m in missing) + "."
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="where gpu_cost_sm<arch>.md / .json go (default: benchmarks/results)",
    )
    parser.add_argument("--arch", default="90", help="SM architecture to compile for (default 90)")
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=REPO / "build" / "gpu_cost_report",
        help="CMake tree and cubin cache (default: build/gpu_cost_report)",
    )
    parser.add_argument("--force", action="store_true", help="recompile even when the inputs are unchanged")
    args = parser.parse_args(argv)
    try:
        tools = find_tools()
        sources = sorted(Path(p) for p in glob.glob(str(REPO / "csrc" / "cuda" / "*.cu")))
        if not sources:
            raise ReportError("no csrc/cuda/*.cu found")
        nvcc_version = tool_version(tools["nvcc"])
        print(
            f"nvcc {nvcc_version}: {tools['nvcc']}\ncuobjdump: {tools['cuobjdump']}\ndemangler: {tools['demangler']}",
            flush=True,
        )
        build = args.build_dir / f"sm{args.arch}"
        entries = configure(tools, build / "cmake", args.arch)
        cache = build / "cubin"
        cache.mkdir(parents=True, exist_ok=True)
        kernels: list[dict] = []
        for n, source in enumerate(sources, 1):
            entry = entries.get(os.path.realpath(source))
            if entry is None:
                raise ReportError(f"{source} is not in the CMake build's compile commands")
            cubin, log = compile_source(entry, source, cache, nvcc_version, args.force, f"[{n}/{len(sources)}]")
            ptxas = {name: r for name, r in parse_ptxas(log).items() if r["arch"] == f"sm_{args.arch}"}
            sass = parse_sass(disassemble(tools["cuobjdump"], cubin))
            names = demangle(sorted(set(ptxas) | set(sass)), tools["demangler"])
            found = analyse(ptxas, sass, names, str(source.relative_to(REPO)))
            print(f"    {len(found)} kernels, {sum(len(k['hot_loops']) for k in found)} hot loops", flush=True)
            kernels += found
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kernels.sort(key=_sort_key)
    report = {
        "arch": args.arch,
        "static_estimate": "not yet run on a GPU",
        "sources": source_state(),
        "tools": {"nvcc_version": nvcc_version, "cuobjdump_version": tool_version(tools["cuobjdump"])},
        "machine_model": {
            "schedulers_per_sm": SCHEDULERS_PER_SM,
            "warp_lanes": WARP_LANES,
            "mufu_lanes_per_sm": MUFU_LANES_PER_SM,
            "gpus": GPUS,
        },
        "kernels": kernels,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = args.out / f"gpu_cost_sm{args.arch}.md", args.out / f"gpu_cost_sm{args.arch}.json"
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {md_path} and {json_path}")
    for k, lp, tag in _hot_loop_rows(kernels):
        if lp.get("elements"):
            b = lp["bounds"]["H100 SXM"]
            print(
                f"  {k['kernel'] + tag:60s} {k['dtypes']:10s} loop {lp['range'][0]}-{lp['range'][1]}  "
                f"{lp['instructions_per_element']:5.1f} instr/elem  "
                f"H100 {b['bound']}-bound, {100 * b['fraction_of_floor']:.0f} % of floor"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
