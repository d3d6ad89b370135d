"""MkDocs hook: the config reference of ``cli.md``, generated from the registered config dataclasses.

Why a hook instead of a generated file under version control: the reference is derived data (field names, types,
defaults, help texts and preset values all live in the code), so building it when the site is built means it can
never be stale and needs no "regenerate and commit" step or freshness test. The hook needs nothing beyond MkDocs
itself (no mkdocs-gen-files), and ``tests/test_docs.py`` calls :func:`reference` directly to check its content.

The marker ``<!-- config-reference -->`` in ``cli.md`` is replaced by one section per registered experiment and
benchmark: every key with its type, default, the value each preset runs (blank where it runs the default) and
the help text.
"""

from __future__ import annotations

import html
from typing import Any

MARKER = "<!-- config-reference -->"


def _cell(text: str, code: bool = False) -> str:
    """A table cell: HTML-escaped, pipes as entities (they would split the cell); code spans where they survive."""
    if code and "|" not in text and "`" not in text:
        return f"`{text}`"
    return html.escape(text, quote=False).replace("|", "&#124;")


def _section(entry: Any, command: str) -> list[str]:
    from leanfit.core.config import config_help, flat_values

    presets = {name: flat_values(entry.preset_config(name)) for name in entry.presets}
    lines = [f"### `leanfit {command} {entry.name}`", "", _cell(entry.description), "",
             "| key | type | default | " + " | ".join(f"`{p}`" for p in presets) + " | help |",
             "|---|---|---|" + "---|" * len(presets) + "---|"]
    for key, tp, default, help_text in config_help(entry.config_cls):
        runs = [repr(values[key]) for values in presets.values()]
        cells = [_cell(key, True), _cell(tp, True), _cell(default, True),
                 *(_cell(v, True) if v != default else "" for v in runs), _cell(help_text)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def reference() -> str:
    """The markdown of every registered experiment's and benchmark's config keys."""
    from leanfit.core import registry
    from leanfit.core.runner import RUN_KEYS

    lines = ["## Config reference", "",
             "Generated from the config dataclasses when the site is built. A preset column is blank where the "
             "preset runs the default. `leanfit run NAME --help-config --preset P` prints the same for one entry.",
             "", "Every experiment also takes " + ", ".join(f"`{k}` ({_cell(h)})" for k, h in RUN_KEYS.items()) + ".",
             ""]
    for kind, command in (("experiment", "run"), ("benchmark", "bench")):
        lines += [f"## {kind.capitalize()}s", ""]
        for entry in registry.entries(kind):
            lines += _section(entry, command)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"cli.md lacks the marker {MARKER!r} where the config reference goes")
    return markdown.replace(MARKER, reference())
