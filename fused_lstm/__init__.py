"""fused_lstm: a drop-in torch.nn.LSTM / nn.LSTMCell running fused C++/CUDA kernels.

    import fused_lstm
    lstm = fused_lstm.LSTM(10, 20, num_layers=2, batch_first=True)
    model = fused_lstm.convert(model)  # every nn.LSTM / nn.LSTMCell of an existing model
"""
from . import functional
from ._ops import ops
from ._backend import backend_info, warn_about_fallbacks
from .convert import convert, revert
from .modules import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "backend_info", "convert", "functional", "ops", "revert"]

warn_about_fallbacks()
__version__ = "0.1.0"
