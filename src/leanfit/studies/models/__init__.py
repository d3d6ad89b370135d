"""Models: tiny Llama trunks built from a config and pretrained models that load offline."""

from leanfit.studies.models.pretrained import ALIASES, load_pretrained, resolve_pretrained_path
from leanfit.studies.models.tiny_llama import tiny_llama

__all__ = ["ALIASES", "load_pretrained", "resolve_pretrained_path", "tiny_llama"]
