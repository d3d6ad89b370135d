"""Infrastructure that knows no method: configs, registry, run folders, checkpoints, device, seeds, reports."""

from leanfit.core.config import BaseConfig, coerce, config_help, load_yaml, option, parse_overrides
from leanfit.core.errors import ConfigError, LeanfitError, MissingDependencyError, RunExistsError
from leanfit.core.registry import Entry, discover, entries, get, register
from leanfit.core.runs import RunDir, is_main_process

__all__ = [
    "BaseConfig",
    "ConfigError",
    "Entry",
    "LeanfitError",
    "MissingDependencyError",
    "RunDir",
    "RunExistsError",
    "coerce",
    "config_help",
    "discover",
    "entries",
    "get",
    "is_main_process",
    "load_yaml",
    "option",
    "parse_overrides",
    "register",
]
