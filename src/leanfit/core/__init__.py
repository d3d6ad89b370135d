"""Infrastructure that knows no method: configs, errors, run folders, checkpoints, device, seeds, measuring
(``bench``), statistics (``stats``), job runners (``parallel``) and, for the studies above it, the registry, the
runner and the reports. Names resolve on first use, so importing a method package loads none of the study
machinery (registry, runner, reports, matplotlib)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanfit.core.lazy import lazy_exports

if TYPE_CHECKING:
    from leanfit.core.config import BaseConfig as BaseConfig
    from leanfit.core.config import coerce as coerce
    from leanfit.core.config import config_help as config_help
    from leanfit.core.config import load_yaml as load_yaml
    from leanfit.core.config import option as option
    from leanfit.core.config import parse_overrides as parse_overrides
    from leanfit.core.errors import ConfigError as ConfigError
    from leanfit.core.errors import LeanfitError as LeanfitError
    from leanfit.core.errors import MissingDependencyError as MissingDependencyError
    from leanfit.core.errors import RunExistsError as RunExistsError
    from leanfit.core.errors import RunFailedError as RunFailedError
    from leanfit.core.errors import RunLockedError as RunLockedError
    from leanfit.core.errors import UnreadableFileError as UnreadableFileError
    from leanfit.core.registry import Entry as Entry
    from leanfit.core.registry import discover as discover
    from leanfit.core.registry import entries as entries
    from leanfit.core.registry import get as get
    from leanfit.core.registry import register as register
    from leanfit.core.runs import RunDir as RunDir
    from leanfit.core.runs import is_main_process as is_main_process
else:
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
