"""DistributedDataParallel: fused_lstm.LSTM trains under DDP (gloo, two CPU processes)
as nn.LSTM does: the same losses, the same parameters after each step, and every
parameter's gradient reduced (DDP fails the next step when one is left out)."""
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_lstm
from testing import assert_close

WORLD = 2
STEPS = 3


class Model(nn.Module):
    def __init__(self, lstm_cls, **kwargs):
        super().__init__()
        self.lstm = lstm_cls(6, 8, batch_first=True, **kwargs)
        self.head = nn.Linear(8 * (2 if kwargs.get("bidirectional") else 1), 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _train(rank, model, xs, ys):
    """STEPS of SGD under DDP on this rank's shard; the losses."""
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x[rank::WORLD]), y[rank::WORLD])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, store_dir, kwargs):
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)  # two ranks on a 2-core machine
        torch.manual_seed(0)  # the same weights and data on both ranks
        reference = Model(nn.LSTM, **kwargs).double()
        fused = Model(fused_lstm.LSTM, **kwargs).double()
        fused.load_state_dict(reference.state_dict())
        xs = [torch.randn(8, 5, 6, dtype=torch.float64) for _ in range(STEPS)]
        ys = [torch.randn(8, 1, dtype=torch.float64) for _ in range(STEPS)]
        result = {"fused_losses": _train(rank, fused, xs, ys),
                  "reference_losses": _train(rank, reference, xs, ys),
                  "fused": fused.state_dict(), "reference": reference.state_dict()}
        torch.save(result, pathlib.Path(store_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch built without the gloo distributed backend")
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, dropout=0.0)])
def test_ddp_trains_like_nn_lstm(tmp_path, kwargs):
    mp.spawn(_worker, args=(str(tmp_path), kwargs), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, res in enumerate(results):
        for a, e in zip(res["fused_losses"], res["reference_losses"]):
            assert abs(a - e) <= 1e-10 * max(1.0, abs(e)), f"rank {rank}: loss {a} vs {e}"
        for name, p in res["fused"].items():
            assert_close(p, res["reference"][name], what=f"rank {rank} {name}")
    # DDP keeps the replicas equal, and the weights moved.
    for name, p in results[0]["fused"].items():
        assert torch.equal(p, results[1]["fused"][name]), name
    torch.manual_seed(0)
    initial = Model(nn.LSTM, **kwargs).double().state_dict()
    assert not torch.equal(results[0]["fused"]["lstm.weight_hh_l0"], initial["lstm.weight_hh_l0"])
