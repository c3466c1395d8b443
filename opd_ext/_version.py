"""The release, in one place (pyproject.toml carries the same number for the package index)."""

__version__ = "0.1.0"
