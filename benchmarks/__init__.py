"""Benchmarks of the QnA kernels against every peer and against the hardware floors.

``python -m benchmarks`` measures on a CUDA GPU and writes ``benchmarks/results/<gpu>/``;
``python -m benchmarks --smoke --out DIR`` runs the whole harness on CPU on tiny shapes (no numbers
claimed). See ``benchmarks/README.md``.
"""

SMOKE_LABEL = "smoke: not a measurement"
