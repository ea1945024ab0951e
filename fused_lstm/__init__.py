"""fused_lstm: a drop-in torch.nn.LSTM / nn.LSTMCell running fused C++/CUDA kernels.

    import fused_lstm
    lstm = fused_lstm.LSTM(10, 20, num_layers=2, batch_first=True)
"""
from . import functional
from ._ops import ops
from .modules import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "functional", "ops"]
__version__ = "0.1.0"
