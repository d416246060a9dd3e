"""Two gloo processes on the CPU give the result of one process (score, ablate, validate)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import fxgndi
from fxgndi.gndi.distributed import my_batches, rank_and_world

from tests.helpers import make_tiny

N_BATCHES = 5  # odd: rank 0 gets three batches, rank 1 two


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_BATCHES * 3, 2, 6, 6, generator=g)
    y = torch.randint(0, 3, (N_BATCHES * 3,), generator=g)
    return x, y


def _runs(loader):
    """Everything compared, as arrays: run the same way in one process and in two."""
    model = make_tiny()
    out = {}
    s = fxgndi.score(model, loader, sites=["conv", "bn"], granularity="channel",
                     readout="loss", progress=False)
    out["score"], out["score_stderr"], out["n"] = s.values, s.stderr, s.n_samples
    out["probe"] = fxgndi.score(model, loader, mode="probe", probes=8, progress=False).values
    out["ablate"] = fxgndi.ablate(model, loader, metric="loss", max_batches=4,
                                  progress=False).values
    report = fxgndi.validate(model, loader, importances=["gndi", "ablation"], truth="logit_l2",
                             n_boot=50, progress=False)
    out["validate_truth"] = report.truth.values
    out["validate_gndi"] = report.estimates["gndi"]
    return out


def _worker(rank: int, world: int, port: int, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        x, y = _data()
        assert rank_and_world() == (rank, world)
        loader = DataLoader(TensorDataset(x, y), batch_size=3)
        assert list(my_batches(list(range(N_BATCHES)))) == [[0, 2, 4], [1, 3]][rank]
        out = _runs(loader)
        lists = _runs([(a, b) for a, b in zip(x.split(3), y.split(3))])  # a plain list
        if rank == 0:  # the ranks hold the same results; rank 0 writes them
            torch.save({"loader": out, "list": lists}, result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_gloo_processes_equal_one_process(tmp_path):
    result = tmp_path / "rank0.pt"
    # fork: the children reuse the imported modules (spawn would re-import them: ~15 s here)
    mp.start_processes(_worker, args=(2, _free_port(), str(result)), nprocs=2, join=True,
                       start_method="fork")
    both = torch.load(result, weights_only=False)
    x, y = _data()
    single = _runs(DataLoader(TensorDataset(x, y), batch_size=3))
    for kind in ("loader", "list"):
        got = both[kind]
        assert got["n"] == single["n"] == N_BATCHES * 3
        for key in single:
            np.testing.assert_allclose(got[key], single[key], rtol=1e-5, atol=1e-9,
                                       err_msg=f"{kind}: {key}")
