"""leanfit: PyTorch implementations of five recent methods, reproduced on offline data.

Subpackages import lazily; ``import leanfit`` itself is cheap so that ``leanfit --help`` answers fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("leanfit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
