"""Offline autotuning of the QnA kernels: ``python -m autotune`` (see :mod:`autotune.cli`).

* :mod:`autotune.plan`: which problems and candidate configs are tuned, and the time estimate;
* :mod:`autotune.bench`: random inputs, single-kernel launches, the same-result check, ``do_bench``;
* :mod:`autotune.tuner`: the resumable loop writing ``<gpu>.json`` after every entry;
* :mod:`autotune.report`: heuristic vs tuned times, speedups, geometric means;
* :mod:`autotune.model_shapes`: the QnA problems of a model's forward pass.

The file format and the run-time look-up live in :mod:`qna_triton.tuning`.
"""
