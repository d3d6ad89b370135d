"""The documentation: every ```python block under docs/ runs as written, and the generated config reference of
docs/cli.md lists every registered key with its type, default and preset values.

A block runs on its own in a fresh namespace (the examples do not share state), in this process, with its own
asserts as the check. A block that must not run (it needs a network or a GPU) is fenced ```py instead. README.md's
quickstarts run too."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
RUN_INFO = "python"  # the info string of a block the tests run
SHOW_INFO = "py"  # shown (highlighted as Python), never run


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every block fenced exactly ```python."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1).strip() == RUN_INFO]


CASES = [(path, line, code) for path in DOC_FILES for line, code in python_blocks(path)]


@pytest.mark.parametrize(("path", "line", "code"), CASES,
                         ids=[f"{path.relative_to(ROOT)}:{line}" for path, line, _ in CASES])
def test_python_example_runs(path: Path, line: int, code: str, one_thread: None) -> None:
    # the file name and line in tracebacks point at the block; its asserts are the check
    exec(compile("\n" * line + code, str(path), "exec"), {"__name__": "__docs_example__"})


@pytest.mark.parametrize("method", ["vq_logits", "noisefit", "iapt", "neural_de", "moe"])
def test_every_method_page_has_a_running_example(method: str) -> None:
    assert python_blocks(ROOT / "docs" / "methods" / f"{method}.md"), f"docs/methods/{method}.md has no ```python"


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_python_like_fences_are_run_or_marked_shown(path: Path) -> None:
    """A fence such as ```python3 or ```python title="x" would be neither run nor deliberately skipped."""
    infos = [m.group(1).strip() for m in FENCE.finditer(path.read_text(encoding="utf-8"))]
    odd = [info for info in infos if info.lower().startswith("py") and info not in (RUN_INFO, SHOW_INFO)]
    assert not odd, f"{path.name}: fences {odd}; use ```{RUN_INFO} (run by the tests) or ```{SHOW_INFO} (shown only)"


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(reference: str, heading: str) -> dict[str, list[str]]:
    """The table rows under ``heading``, by key: [type, default, preset cells..., help]."""
    section = reference.split(heading + "\n", 1)[1].split("\n### ", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {row[0].strip("`"): [cell.strip("`") for cell in row[1:]] for row in rows}


def test_config_reference_has_every_entry_key_type_default_and_preset_value() -> None:
    from leanfit.core import registry
    from leanfit.core.config import config_help

    reference = _hook().reference()
    for kind, command in (("experiment", "run"), ("benchmark", "bench")):
        for entry in registry.entries(kind):
            rows = _rows(reference, f"### `leanfit {command} {entry.name}`")
            assert list(rows) == [key for key, *_ in config_help(entry.config_cls)], entry.name
    lm = _rows(reference, "### `leanfit run lm-baseline`")
    assert lm["train.steps"][:4] == ["int", "300", "", "3000"]  # type, default, quick (the default), full
    moe = _rows(reference, "### `leanfit bench moe`")
    assert moe["ks"][0] == "list[int]"


def test_config_reference_replaces_its_marker_in_cli_md_only() -> None:
    hook = _hook()

    class Page:
        def __init__(self, uri: str) -> None:
            self.file = type("File", (), {"src_uri": uri})()

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert hook.MARKER in text
    built = hook.on_page_markdown(text, page=Page("cli.md"))
    assert hook.MARKER not in built and "### `leanfit run lm-baseline`" in built
    assert hook.on_page_markdown(text, page=Page("index.md")) == text
