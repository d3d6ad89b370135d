"""The check every bad-input test makes: the call raises the given error type and its message names the parameter
(and, for messages built with ``leanfit.core.errors.bad_value``, says what was expected)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def assert_user_error(error: type[Exception], fragments: str | tuple[str, ...], call: Callable[[], Any], *,
                      expected: bool = False) -> str:
    """``call()`` raises ``error`` whose message holds every fragment (and the word "expected" when ``expected``);
    returns the message."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [f for f in ((fragments,) if isinstance(fragments, str) else fragments) if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    assert not expected or "expected" in message, f"no 'expected' in {message!r}"
    return message
