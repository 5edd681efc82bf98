"""``python -m benchmarks.gpu_report``."""

from .cli import main

raise SystemExit(main())
