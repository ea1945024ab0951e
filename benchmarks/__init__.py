"""fused_lstm's benchmarks, installed as the package ``fused_lstm.bench``.

Run them with ``python -m fused_lstm.benchmark`` (or ``fused-lstm-benchmark``).
"""
