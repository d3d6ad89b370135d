"""The NoiseFiT studies: ``leanfit run noisefit`` (a controlled hallucination benchmark: a fact world, a tiny Llama
pretrained on it, SFT arms, deterministic metrics with bootstrap intervals) and ``leanfit bench noisefit``."""
