"""The studies that measure the five methods: experiments (``leanfit run NAME``), benchmarks (``leanfit bench
NAME``), their reports, and the inputs they share (``data``: offline corpora, labelled text, fact tables and images;
``models``: tiny Llama trunks and offline pretrained models; ``lm``: the language-model training loop).

Layers import only downward: ``leanfit.core`` <- the method packages (``leanfit.vq_logits``, ``leanfit.noisefit``,
``leanfit.iapt``, ``leanfit.neural_de``, ``leanfit.moe``) <- ``leanfit.studies`` <- ``leanfit.cli``. A method package
never imports anything from here. The registry imports every ``leanfit.studies.<name>.experiment`` and ``.bench``
module, which therefore stay light: configs at module level, heavy imports inside the run functions.
"""
