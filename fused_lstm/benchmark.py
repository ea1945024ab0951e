"""``python -m fused_lstm.benchmark``: fused_lstm.LSTM against torch.nn.LSTM.

The suites and the runner live in the repository's ``benchmarks/`` folder,
installed as ``fused_lstm.bench``. See ``--help``.
"""
import sys

from .bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
