"""make_private(distributed=True): two processes (gloo, CPU) take exactly the single-process step.

Each rank holds part of the batch; the update every rank applies must equal the update of one
process on the union batch, noise included (each rank draws the noise of its own range of every
parameter's elements, from the same key). Also: rank 0's weights reach every rank, a rank with an
empty batch takes part through noise_only_step, a failure on one rank refuses the step on all of
them, and the noise of a range of elements drawn alone (``offset``) is exactly that range of the
whole draw. DDP and FSDP2: tests/test_distributed_engines.py.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import dpkernels

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

B, SEED = 7, 1234
SHARDS = {
    "split": (slice(0, 4), slice(4, 7)),
    "rank1_empty": (slice(0, 7), slice(0, 0)),
    "tied_split": (slice(0, 4), slice(4, 7)),
}


def _model(tied: bool = False) -> nn.Module:
    """With ``tied``, two linear layers share one weight: its cross terms are per rank, its noise once."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    if tied:
        model[5].weight = model[3].weight
    return model


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 5, generator=g) * 2, torch.randint(0, 3, (B,), generator=g)


def _private(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return dpkernels.make_private(
        model,
        opt,
        noise_multiplier=0.8,
        max_grad_norm=0.3,
        expected_batch_size=B,
        loss_reduction="mean",
        seed=SEED,
        backend="torch",
        **kw,
    )


def _worker(rank: int, world: int, rendezvous: str, case: str, out_dir: str) -> None:
    if os.path.exists("/sys/class/net/lo"):  # loopback only: gloo would bind the host name's address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model = _model(tied=case.startswith("tied"))
        if rank == 1:  # different initial weights: make_private must broadcast rank 0's
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        model, opt = _private(model, distributed=True)
        x, y = _data()
        if case == "nan" and rank == 1:
            x = x.clone()
            x[4, 0] = float("nan")
        shard = SHARDS["split" if case == "nan" else case][rank]
        result = {}
        if shard.stop > shard.start:
            F.cross_entropy(model(x[shard]), y[shard]).backward()
            try:
                opt.step()
            except (RuntimeError, FloatingPointError) as e:
                result["error"] = f"{type(e).__name__}: {e}"
        else:
            opt.noise_only_step()
        result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(case: str, tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), case, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _single_process(rows: slice, tied: bool = False):
    model, opt = _private(_model(tied))
    x, y = _data()
    F.cross_entropy(model(x[rows]), y[rows]).backward()
    opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["split", "rank1_empty", "tied_split"])
def test_two_ranks_take_the_single_process_step(case, tmp_path):
    ranks = _run(case, tmp_path)
    # loss_reduction="mean": each rank's loss is its own mean; the engine rescales per rank, so the
    # union batch's step is the one-process step on all 7 examples
    expected = _single_process(slice(0, 7), tied=case.startswith("tied"))
    for r, res in enumerate(ranks):
        assert "error" not in res, res.get("error")
        for n, p in res["params"].items():
            torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=f"rank {r} {n}")


def test_a_failure_on_one_rank_refuses_the_step_on_all(tmp_path):
    ranks = _run("nan", tmp_path)
    assert ranks[1]["error"].startswith("FloatingPointError: non-finite per-example gradient norm")
    assert "failed on another rank" in ranks[0]["error"]
    start = _model()
    for res in ranks:  # nobody updated: both still hold rank 0's initial weights
        for n, p in start.named_parameters():
            torch.testing.assert_close(res["params"][n], p.detach(), msg=n)


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised first"):
        _private(_model(), distributed=True)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        _private(_model(), distributed="yes")


def test_single_process_step_is_unchanged_by_the_rank_logic():
    """The refusal of a failed step still raises the rank's own error in a single process."""
    model, opt = _private(copy.deepcopy(_model()))
    x, y = _data()
    x[0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


@pytest.mark.parametrize("numel,offset", [(1, 0), (1, 7), (6, 3), (33, 1), (40, 64), (2, 99)])
def test_noise_with_an_offset_is_that_range_of_the_whole_draw(numel, offset):
    """A rank draws only its shard: elements offset .. offset+numel-1, an odd offset starting mid-pair."""
    from dpkernels.ops.philox import PhiloxKey, normal, philox_normal

    key = PhiloxKey(0xDEADBEEF12345, step=4, stream=9)
    whole = philox_normal(offset + numel, key)
    assert torch.equal(philox_normal(numel, key, offset=offset), whole[offset:])
    assert torch.equal(normal(numel, key, offset=offset), normal(offset + numel, key)[offset:])
    noise = dpkernels.functional.gaussian_noise((numel,), std=0.25, generator=key, offset=offset, backend="torch")
    assert torch.equal(
        noise, dpkernels.functional.gaussian_noise((offset + numel,), std=0.25, generator=key, backend="torch")[offset:]
    )


def test_noise_offset_is_checked():
    from dpkernels.ops.philox import PhiloxKey

    with pytest.raises(ValueError, match="offset must be in"):
        dpkernels.functional.gaussian_noise((3,), std=1.0, generator=PhiloxKey(1), offset=-1)
    with pytest.raises(TypeError, match="offset must be an int"):
        dpkernels.functional.gaussian_noise((3,), std=1.0, generator=PhiloxKey(1), offset=1.5)
