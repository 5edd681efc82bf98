"""Offline autotuning of the QnA kernels: ``python -m qna_triton.autotune`` (see :mod:`qna_triton.autotune.cli`).

* :mod:`qna_triton.autotune.plan`: which problems and candidate configs are tuned, and the time estimate;
* :mod:`qna_triton.autotune.bench`: random inputs, single-kernel launches, the same-result check, ``do_bench``;
* :mod:`qna_triton.autotune.tuner`: the resumable loop writing ``<gpu>.json`` after every entry;
* :mod:`qna_triton.autotune.report`: heuristic vs tuned times, speedups, geometric means;
* :mod:`qna_triton.autotune.model_shapes`: the QnA problems of a model's forward pass.

The file format and the run-time look-up live in :mod:`qna_triton.tuning`.
"""
