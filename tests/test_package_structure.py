"""The layout of the Python package (docs/architecture.md): dependencies point one way, no module
reaches into another's private names, every op has its wrapper and fake in the op layer, and the
constants shared with C++ are the C++ ones."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import opd_ext
from opd_ext import _extension, ops

PACKAGE = Path(opd_ext.__file__).parent
REPO = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    """A Python module of the package, or a compiled one (opd_ext._C, opd_ext._simt)."""
    if name in MODULES:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, module: str, level: int) -> str:
    """The absolute module named by an import inside ``module`` (``level`` dots)."""
    if level == 0:
        return name
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str):
    """(imported opd_ext module, names taken from it, line) for every import statement of
    ``module``, at any depth (an import inside a function is a dependency too)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "opd_ext":
                    yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node.module or "", module, node.level)
            if source.split(".")[0] != "opd_ext":
                continue
            names = []
            for alias in node.names:
                if _is_module(f"{source}.{alias.name}"):  # `from package import module`
                    yield f"{source}.{alias.name}", (), node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield source, tuple(names), node.lineno


def _graph() -> dict:
    graph = {}
    for module in MODULES:
        deps = set()
        for target, _, _ in _imports(module):
            # Compiled modules (opd_ext._C) import nothing of ours: leaves, left out.
            if target in MODULES and target != module:
                deps.add(target)
        graph[module] = deps
    return graph


def _cycles(graph: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    # A package's __init__ imports its submodules to re-export them, so a submodule importing a
    # name from its own package (or from opd_ext itself) closes a cycle through it.
    assert _cycles(_graph()) == []


# docs/architecture.md's layers, bottom up: a module imports only from its own layer or below.
LAYERS = [
    ["opd_ext._version", "opd_ext._extension"],
    ["opd_ext.torch_backend"],
    ["opd_ext.ops"],
    ["opd_ext._validation"],
    ["opd_ext.objective"],
    ["opd_ext.distributed*"],
    ["opd_ext.losses", "opd_ext.sparse_teacher", "opd_ext.topk_kl", "opd_ext.lm_head", "opd_ext.fused_linear"],
    ["opd_ext.prune"],
    ["opd_ext.modules", "opd_ext.served", "opd_ext.generation*"],
    ["opd_ext.integrations*"],
    # test support and the entry points on top
    ["opd_ext.reference", "opd_ext.testing", "opd_ext.__main__", "opd_ext"],
]


def _layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith("*") and (module + ".").startswith(name[:-1] + ".")):
                return rank
    raise AssertionError(f"{module} is in no layer of LAYERS (docs/architecture.md): place it there")


def test_dependencies_point_down_the_layers():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert upward == []


def test_the_cycle_check_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_imported_across_modules():
    # A name with a leading underscore is private to its module (modules whose own name starts
    # with one, like opd_ext._validation, are private to the package and importable inside it).
    offenders = []
    for module in MODULES:
        for source, names, line in _imports(module):
            offenders += [
                f"{module}:{line} imports {source}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
            ]
        tree = ast.parse(MODULES[module].read_text())
        imported = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            for a in n.names
            if _is_module(f"{_resolve(n.module or '', module, n.level)}.{a.name}")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert offenders == []


def _uses_compiled_ops(path: Path) -> bool:
    """Whether the code (not a docstring) names ``torch.ops.opd_ext``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "opd_ext"
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ops"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "torch"
        ):
            return True
    return False


def test_only_the_op_layer_calls_the_compiled_ops():
    assert [name for name, path in MODULES.items() if _uses_compiled_ops(path)] == ["opd_ext.ops"]


def _schema_ops() -> list:
    schemas = (REPO / "csrc" / "op_schemas.h").read_text()
    return re.findall(r'm\.def\(\s*"(\w+)\(', schemas)


def test_every_op_has_a_wrapper_and_a_fake():
    names = _schema_ops()
    assert len(names) >= 8
    for name in names:
        assert callable(getattr(ops, name, None)), f"opd_ext.ops has no wrapper for opd_ext::{name}"
        assert hasattr(torch.ops.opd_ext, name)
        entry = torch._library.simple_registry.singleton.find(f"opd_ext::{name}")
        assert entry.fake_impl.kernel is not None, f"opd_ext::{name} has no fake"


def test_stop_reason_is_the_cpp_enum():
    codes = _extension.kernel_limits()["drift_stop_reasons"]
    ours = {name: code for code, name in opd_ext.StopReason.NAMES.items()}
    assert ours == codes


def test_streaming_topk_limit_is_read_from_the_extension():
    assert ops.MAX_STREAMING_TOPK == _extension.kernel_limits()["max_streaming_topk"]
    header = (REPO / "csrc" / "include" / "opd" / "cuda" / "limits.h").read_text()
    assert "kMaxStreamingTopK" in header and "1024" not in Path(ops.__file__).read_text()


def test_streaming_topk_limit_is_the_kernels(device):
    """The op layer's limit is where the CUDA kernel starts refusing k: at the limit the kernel
    runs, one past it the raw op raises and the op layer takes the torch backend."""
    if not ops.runs_cuda_kernels(torch.empty(0, device=device)):
        pytest.skip("the CPU kernels take any k")
    limit = ops.MAX_STREAMING_TOPK
    s, t = torch.randn(2, limit + 64, device=device), torch.randn(2, limit + 64, device=device)
    want = opd_ext.reference.topk_overlap(s, t, limit).float()
    torch.testing.assert_close(torch.ops.opd_ext.topk_overlap(s, t, limit), want)
    with pytest.raises(RuntimeError, match=f"k <= {limit}"):
        torch.ops.opd_ext.topk_overlap(s, t, limit + 1)
    got = ops.topk_overlap(s, t, limit + 1)
    torch.testing.assert_close(got, opd_ext.reference.topk_overlap(s, t, limit + 1).float())


def test_the_oracle_is_not_production_code():
    """opd_ext.reference is what the tests check against; the library itself never calls it (its
    plain-PyTorch path is opd_ext.torch_backend). opd_ext re-exports it for users' own checks."""
    users = sorted(m for m in MODULES if m != "opd_ext" and "opd_ext.reference" in _graph()[m])
    assert users == []
