"""The reference program: the tutorial model fused_lstm grew from, trained with
torch.nn.LSTM and with fused_lstm.LSTM side by side from the same weights and data.

Model: a 2-layer LSTM (input 10, hidden 20, batch_first) and a Linear head on
the last time step; MSE loss, Adam (lr 1e-3), batch 32, sequence length 5,
100 steps. The model code is unchanged between the two runs: only the LSTM
class passed in differs.

    python benchmarks/reference_program.py
"""
import argparse
import copy
import time

import torch
from torch import nn
from torch.utils import benchmark

BATCH, SEQ_LEN, INPUT, HIDDEN, LAYERS, STEPS, LR = 32, 5, 10, 20, 2, 100, 1e-3


class Model(nn.Module):
    def __init__(self, lstm_cls=nn.LSTM):
        super().__init__()
        self.lstm = lstm_cls(input_size=INPUT, hidden_size=HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1, :])


def make_data(steps=STEPS, seed=0, dtype=torch.float32):
    """One batch per step: x [32, 5, 10]; y [32, 1] a smooth function of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, BATCH, SEQ_LEN, INPUT, generator=g, dtype=dtype)
    y = torch.sin(x.sum(dim=(2, 3), keepdim=True).squeeze(-1) / 4) + 0.1 * x[:, :, -1, :1]
    return list(zip(x, y))


def train(model, data):
    """Trains `model` in place on `data`; returns the loss of every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.MSELoss()
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def paired_models(seed=0, dtype=torch.float32):
    """An nn.LSTM model and a fused_lstm.LSTM model with identical weights."""
    import fused_lstm

    torch.manual_seed(seed)
    reference = Model(nn.LSTM).to(dtype)
    fused = Model(fused_lstm.LSTM).to(dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def step_time(model, data):
    """Median time of one training step (forward, backward, Adam), torch.utils.benchmark."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = data[0]

    def step():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    # num_threads: Timer's default is 1, whatever torch is set to.
    return benchmark.Timer("step()", globals={"step": step},
                           num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=1.0).median


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = make_data(args.steps, args.seed)
    reference, fused = paired_models(args.seed)
    times = {"nn.LSTM": step_time(reference, data), "fused_lstm.LSTM": step_time(fused, data)}
    start = time.perf_counter()
    ref_losses = train(reference, data)
    ref_wall = time.perf_counter() - start
    start = time.perf_counter()
    fused_losses = train(fused, data)
    fused_wall = time.perf_counter() - start

    print(f"reference program: {LAYERS}-layer LSTM({INPUT}, {HIDDEN}), batch {BATCH}, "
          f"seq {SEQ_LEN}, Adam lr {LR}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'step':>5} {'nn.LSTM loss':>14} {'fused loss':>14} {'rel diff':>10}")
    for i, (a, b) in enumerate(zip(ref_losses, fused_losses)):
        if i % 10 == 0 or i == len(ref_losses) - 1:
            print(f"{i:>5} {a:>14.6f} {b:>14.6f} {abs(a - b) / abs(a):>10.2e}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, fused_losses))
    print(f"largest relative loss difference over all steps: {worst:.2e}")
    print(f"training wall time: nn.LSTM {ref_wall:.3f} s, fused_lstm {fused_wall:.3f} s")
    t_ref, t_fused = times["nn.LSTM"], times["fused_lstm.LSTM"]
    print(f"one training step (median): nn.LSTM {t_ref * 1e6:.0f} us, fused_lstm {t_fused * 1e6:.0f} us, "
          f"speedup {t_ref / t_fused:.2f}x")


if __name__ == "__main__":
    main()
