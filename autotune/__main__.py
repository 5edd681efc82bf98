"""``python -m autotune`` in a checkout: the autotuner is :mod:`qna_triton.autotune` (installed with the package)."""

import sys

from qna_triton.autotune.cli import main

sys.exit(main())
