"""The VQ-Logits studies: ``leanfit run vq-logits`` (heads from scratch against full softmax; SmolLM2's head) and
``leanfit bench vq-logits``."""
