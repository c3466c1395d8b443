"""The wheel's dependencies, with torch pinned to the release this build compiles against.

A scikit-build-core dynamic-metadata provider ([[tool.dynamic-metadata]] in pyproject.toml). The
compiled extension links against one torch's C++ ABI, so a wheel that accepted any torch would
install fine and then fail to import; pinning the release lets pip say so (or install that torch).
The source distribution keeps the open range: it compiles against whatever torch is present.
"""

from __future__ import annotations


class TorchRequirement:
    def __init__(self) -> None:
        self.state = "wheel"

    def build_state(self, state: str) -> None:
        self.state = state

    def dynamic_wheel(self, settings):
        return {"dependencies": True}

    def dynamic_metadata(self, settings, project):
        if self.state == "sdist":
            torch_requirement = settings["torch"]
        else:
            torch_requirement = f"torch=={built_against()}"
        return {"dependencies": [torch_requirement, *settings.get("dependencies", [])]}


def built_against() -> str:
    """The release of the torch installed where this builds (read from its package metadata, which
    is quicker than importing it). A local label (+cu130, +cpu) is dropped: the package index's
    torch has none, so requiring one would make the wheel uninstallable from there."""
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "opd_ext compiles against the torch installed where it is built, and there is none here. "
            "Install torch and the build tools, then build without isolation: "
            "pip install --no-build-isolation ."
        ) from exc
    return version.split("+")[0]
