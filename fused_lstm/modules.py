"""Drop-in modules. They subclass torch.nn.LSTM / nn.LSTMCell, so the
constructor, parameters (names, shapes, order, initialisation), state_dict,
extra_repr and argument checks are nn's own; forward runs the fused ops."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _onnx, functional

__all__ = ["LSTM", "LSTMCell"]


def _check_devices(input: Tensor, hx: Tuple[Tensor, Tensor], params: List[Tensor]) -> None:
    # The same checks and messages as torch.nn.LSTM's native path.
    for h in hx:
        if h.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {h.device}")
    for p in params:
        if p.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {p.device}")


class LSTM(nn.LSTM):
    r"""Drop-in replacement for :class:`torch.nn.LSTM` running fused kernels.

    Same constructor (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
    device=None, dtype=None``), parameters and ``state_dict`` as nn.LSTM, so
    checkpoints load both ways. ``forward(input, hx=None)`` takes
    ``(L, N, H_in)`` (``(N, L, H_in)`` with ``batch_first``), unbatched
    ``(L, H_in)`` or a PackedSequence, and returns ``output, (h_n, c_n)`` with
    nn.LSTM's shapes. The whole stack is one op call (in training, one autograd
    node; with dropout between layers, one call per layer and direction). Each
    layer and direction runs one input GEMM over all timesteps, then a native
    time loop of one recurrent GEMM and one fused elementwise pass per step.
    ``torch.jit.script`` compiles it (``forward_tensor`` / ``forward_packed``, picked by
    the input's type), and ``torch.onnx.export(..., dynamo=True)`` writes one ONNX
    ``LSTM`` node per layer and direction.
    """

    def flatten_parameters(self) -> None:
        """No-op: the fused kernels read the parameters where they are."""

    def _check_packed_traced(self, input: Tensor, hx: Tuple[Tensor, Tensor], batch_sizes: Tensor,
                             batch: int) -> None:
        # nn.LSTM.check_forward_args with the batch read once: it reads batch_sizes[0]
        # per check, and under torch.compile two reads are two unrelated sizes. The
        # kernels still check h0 and c0 against batch_sizes' data when they run.
        self.check_input(input, batch_sizes)
        directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        self.check_hidden_size(hx[0], (self.num_layers * directions, batch, real_hidden),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hx[1], (self.num_layers * directions, batch, self.hidden_size),
                               "Expected hidden[1] size {}, got {}")

    # TorchScript compiles forward_tensor or forward_packed, by the input's type
    # (its __overloads__ protocol, which torch's dynamic quantized LSTM uses too);
    # Python runs forward. All three run _run_dense / _run_packed.
    __overloads__ = {"forward": ["forward_packed", "forward_tensor"]}

    @torch.jit.ignore
    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        packed = isinstance(input, PackedSequence)
        if isinstance(self, torch.jit.ScriptModule):  # a scripted LSTM, called from Python
            if not packed:
                return self.forward_tensor(input, hx)
            # TorchScript returns a namedtuple of its own: torch's class, as in eager.
            output, hidden = self.forward_packed(input, hx)
            return PackedSequence(*output), hidden
        # The current parameters by name (nn.LSTM's weakref check costs ~10 us a call;
        # Module.__getattr__ 0.6 us a name, so registered parameters are read directly,
        # and anything else, a parametrization say, through getattr).
        params = self._parameters
        weights = [params.get(name) for name in self._flat_weights_names]
        if any(w is None for w in weights):
            weights = [getattr(self, name) for name in self._flat_weights_names]
        if packed:
            return self._run_packed(input, hx, weights)
        return self._run_dense(input, hx, weights)

    @torch.jit.export
    def forward_tensor(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                       ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """TorchScript's forward for a Tensor input: ``forward(input, hx)``."""
        return self._run_dense(input, hx, self._flat_weights)

    @torch.jit.export
    def forward_packed(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
                       ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        """TorchScript's forward for a PackedSequence input: ``forward(input, hx)``."""
        return self._run_packed(input, hx, self._flat_weights)

    def _run_dense(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], weights: List[Tensor]
                   ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # input: [T, B, I] ([B, T, I] batch_first) or unbatched [T, I]
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        batch = input.size(0 if self.batch_first else 1)
        if hx is not None:
            want = 3 if is_batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        state = self._initial_state(input, hx, batch)
        self.check_forward_args(input, state, None)
        _check_devices(input, state, weights)
        if input.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if self.batch_first:
            input = input.transpose(0, 1)
        output, (h_n, c_n) = self._stack(input, state, weights, None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _run_packed(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]],
                    weights: List[Tensor]) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        if not torch.jit.is_scripting():
            if _onnx.exporting():  # before batch_sizes' data is read, which export refuses
                _onnx.refuse_packed()
        data, batch_sizes, sorted_indices, unsorted_indices = input
        # The batch from a size where one has it: under torch.compile a read of
        # batch_sizes' data is a size of its own, which no other size can match.
        if sorted_indices is not None:
            batch = sorted_indices.size(0)
        elif hx is not None and hx[0].dim() == 3:
            batch = hx[0].size(1)
        else:
            batch = int(batch_sizes[0])
        state = self._initial_state(data, hx, batch)
        traced = False
        if not torch.jit.is_scripting():
            traced = torch.compiler.is_compiling()
        if traced:
            self._check_packed_traced(data, state, batch_sizes, batch)
        else:
            self.check_forward_args(data, state, batch_sizes)
        if hx is not None:
            state = self.permute_hidden(state, sorted_indices)
        _check_devices(data, state, weights)
        output, (h_n, c_n) = self._stack(data, state, weights, batch_sizes)
        return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                self.permute_hidden((h_n, c_n), unsorted_indices))

    def _initial_state(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], batch: int
                       ) -> Tuple[Tensor, Tensor]:
        if hx is not None:
            return hx
        # h0 [L*D, B, P] and c0 [L*D, B, H]: one tensor serves both without a projection.
        layers = self.num_layers * (2 if self.bidirectional else 1)
        zeros = input.new_zeros((layers, batch, self.hidden_size))
        if self.proj_size == 0:
            return zeros, zeros
        return input.new_zeros((layers, batch, self.proj_size)), zeros

    def _stack(self, input: Tensor, hx: Tuple[Tensor, Tensor], weights: List[Tensor],
               batch_sizes: Optional[Tensor]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        # input: [T, B, I], or packed data [N, I] with batch_sizes [T]
        return functional.lstm(
            input, hx, weights, self.num_layers, self.bias, self.proj_size > 0,
            self.bidirectional, float(self.dropout), self.training, batch_sizes)


class LSTMCell(nn.LSTMCell):
    r"""Drop-in replacement for :class:`torch.nn.LSTMCell` running the fused op.

    Same constructor (``input_size, hidden_size, bias=True, device=None,
    dtype=None``) and parameters. ``forward(input, hx=None)`` takes ``(N, H_in)``
    or unbatched ``(H_in)``, with ``hx = (h, c)`` or None, and returns ``(h', c')``.
    """

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        # A decoding loop calls this once a token: the Python here is kept to what the
        # checks need (nn.LSTMCell's messages; the full checks run only where a fast test
        # fails). B1 I32 H32: 27 -> 15 us a call, the op alone 9 (PERF_LOG.md row 47).
        dim = input.dim()
        if dim not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {dim}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = dim == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            h = c = input.new_zeros((input.size(0), self.hidden_size))
        elif not is_batched:
            h, c = hx[0].unsqueeze(0), hx[1].unsqueeze(0)
        else:
            h, c = hx[0], hx[1]
        batch, features = input.shape
        if (features != self.input_size or h.shape != c.shape or h.size(0) != batch
                or h.size(1) != self.hidden_size):
            self._check_sizes(input, (h, c))
        if torch.jit.is_scripting():
            w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        else:
            # Registered parameters read directly (Module.__getattr__: ~0.6 us a name);
            # anything else, a parametrization say, through getattr.
            params = self._parameters
            w_ih, w_hh, b_ih, b_hh = (params.get("weight_ih"), params.get("weight_hh"),
                                      params.get("bias_ih"), params.get("bias_hh"))
            if w_ih is None or w_hh is None or (self.bias and (b_ih is None or b_hh is None)):
                w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        weights = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None and b_hh is not None else [])
        if not (input.is_cpu and h.is_cpu and c.is_cpu and all(w.is_cpu for w in weights)):
            _check_devices(input, (h, c), weights)
        h, c = functional.lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def _check_sizes(self, input: Tensor, hx: Tuple[Tensor, Tensor]) -> None:
        # The same checks and messages as torch's lstm_cell.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for idx, h in enumerate(hx):
            if input.size(0) != h.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size {h.size(0)}")
            if h.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, expected {self.hidden_size}")
