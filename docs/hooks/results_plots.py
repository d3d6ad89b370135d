"""MkDocs hook: the plots committed under ``benchmarks/results/`` served at ``results/`` in the site.

Why a hook: the PNGs are results, written by ``leanfit run``/``leanfit bench`` beside the records they are drawn
from, and stay there (one copy, regenerated with the report). At build time each is added to MkDocs' files as
``results/<folder>/.../<name>.png``, so a page links it relatively (``../results/moe/plots/layer_forward.png`` from
``methods/moe.md``), ``--strict`` checks the link, and the image is copied into the built site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PREFIX = "results"


def plot_uris() -> dict[str, Path]:
    """Site path -> file of every committed plot."""
    return {f"{PREFIX}/{png.relative_to(RESULTS).as_posix()}": png for png in sorted(RESULTS.rglob("*.png"))}


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, png in plot_uris().items():
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
