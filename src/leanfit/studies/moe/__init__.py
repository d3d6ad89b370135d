"""The top-K MoE studies: ``leanfit run topk-moe`` (the estimator's Voronoi-loss rates) and ``leanfit bench moe`` (the
sparse layer against Hugging Face's Mixtral block)."""
