"""The public API is typed: mypy accepts ``usage.py`` and rejects each misuse below with the expected error.

If a public name reached the checker as ``Any`` (a lazy export it cannot see, a module ``__getattr__``), the misuses
would pass silently and these tests fail. One mypy run checks every snippet; it reuses the repository's
``.mypy_cache`` (warm after ``make typecheck``; a cold run takes a minute or two)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# name -> (code, mypy error code expected on the line marked `# error`)
MISUSES = {
    "unknown_config_field": (
        """
        from leanfit.noisefit import NoiseFiTConfig

        NoiseFiTConfig(not_a_field=3)  # error
        """,
        "call-arg",
    ),
    "wrong_config_value_type": (
        """
        from leanfit.iapt import IAPTConfig

        IAPTConfig(num_soft_tokens="four")  # error
        """,
        "arg-type",
    ),
    "unknown_public_name": (
        """
        from leanfit.moe import TopKGaussianMoe  # error
        """,
        "attr-defined",
    ),
    "literal_option": (
        """
        import torch

        from leanfit.neural_de import solve

        solve(lambda t, y: -y, torch.zeros(2, 3), [0.0, 1.0], norm="l2")  # error
        """,
        "arg-type",
    ),
    "head_method_argument": (
        """
        import torch

        from leanfit.vq_logits import VQLogitsHead

        head = VQLogitsHead.from_scratch(8, 100, 4)
        head.loss(torch.zeros(2, 8), torch.zeros(2), reduction="avg")  # error
        """,
        "arg-type",
    ),
    "run_config_differs_from_config_cls": (
        """
        from dataclasses import dataclass
        from typing import Any

        from leanfit.core.config import BaseConfig
        from leanfit.core.registry import register
        from leanfit.core.runner import RunContext


        @dataclass
        class A(BaseConfig):
            pass


        @dataclass
        class B(BaseConfig):
            pass


        @register("x", kind="experiment", description="d", config_cls=A)  # error
        def run(ctx: RunContext[B]) -> dict[str, Any]:
            return {}
        """,
        "arg-type",
    ),
}
_ERROR = re.compile(r"^(?P<file>[^:\n]+\.py):(?P<line>\d+): error: (?P<message>.*?)\s+\[(?P<code>[a-z-]+)\]$", re.M)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory) -> dict[str, list[tuple[int, str, str]]]:
    """``{file stem: [(line, code, message)]}`` from one mypy run over usage.py and every misuse snippet."""
    folder = tmp_path_factory.mktemp("typing")
    files = [ROOT / "tests" / "typing" / "usage.py"]
    for name, (code, _) in MISUSES.items():
        files.append(folder / f"misuse_{name}.py")
        files[-1].write_text(textwrap.dedent(code).lstrip())
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context",
                           "--show-error-codes", *map(str, files)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode in (0, 1), f"mypy failed to run (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    errors: dict[str, list[tuple[int, str, str]]] = {}
    for m in _ERROR.finditer(proc.stdout):
        errors.setdefault(Path(m["file"]).stem, []).append((int(m["line"]), m["code"], m["message"]))
    return errors


def test_usage_of_the_public_names_type_checks(mypy_errors):
    assert "usage" not in mypy_errors, "\n".join(f"usage.py:{ln}: [{c}] {msg}" for ln, c, msg in mypy_errors["usage"])


@pytest.mark.parametrize("name", list(MISUSES), ids=list(MISUSES))
def test_misuse_is_a_type_error(mypy_errors, name):
    code, expected = MISUSES[name]
    line = next(i for i, text in enumerate(textwrap.dedent(code).lstrip().splitlines(), 1) if text.endswith("# error"))
    got = mypy_errors.get(f"misuse_{name}", [])
    assert [(ln, c) for ln, c, _ in got] == [(line, expected)], f"expected [{expected}] on line {line}, mypy: {got}"
