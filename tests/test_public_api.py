"""The public API, pinned: every exported name of opd_ext and its public submodules, with the
parameters (name, kind, default) of every function, class and public method. A change here is a
change users see: update tests/public_api.json on purpose (run this file as a script to print the
current surface), never as a side effect of moving code."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("public_api.json")

# Modules whose __all__ is the API, and public modules without one (every public function or
# class they define).
MODULES = [
    "opd_ext",
    "opd_ext.distributed",
    "opd_ext.served",
    "opd_ext.generation",
    "opd_ext.prune",
    "opd_ext.modules",
    "opd_ext.reference",
]
NAMED = {
    "opd_ext.fused_linear": [
        "LinearHead",
        "LoraAdapter",
        "default_chunk_size",
        "fused_linear_reverse_kl_loss",
        "fused_linear_vopd_loss",
        "linear_head",
    ]
}


def _parameters(obj):
    """The call signature without annotations (their text differs between Python versions), and
    without memory addresses in defaults (sentinels print as <object object at 0x...>)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    bare = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )
    return re.sub(r" at 0x[0-9a-f]+", "", str(bare))


def _describe(obj):
    if inspect.isclass(obj):
        members = {}
        for name, member in sorted(vars(obj).items()):
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(member, property):
                members[name] = "property"
            elif callable(member) or isinstance(member, (staticmethod, classmethod)):
                members[name] = _parameters(getattr(obj, name))
        return {"class": _parameters(obj), "members": members}
    if inspect.ismodule(obj):
        return "module"
    if callable(obj):
        return {"function": _parameters(obj)}
    return type(obj).__name__


def public_api() -> dict:
    surface = {}
    for name in MODULES + list(NAMED):
        module = importlib.import_module(name)
        exported = (
            NAMED.get(name)
            or getattr(module, "__all__", None)
            or [
                n
                for n, v in vars(module).items()
                if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == name
            ]
        )
        surface[name] = {n: _describe(getattr(module, n)) for n in sorted(exported) if n != "__version__"}
        if name not in NAMED:
            surface[name]["__all__"] = sorted(getattr(module, "__all__", []))
    return surface


def test_public_api_is_unchanged():
    assert public_api() == json.loads(SNAPSHOT.read_text())


if __name__ == "__main__":
    json.dump(public_api(), sys.stdout, indent=1, sort_keys=True)
    print()
