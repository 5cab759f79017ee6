"""DDP and FSDP2 (gloo, CPU, loopback): every rank takes exactly the one-process step on the union batch.

A GPT-like model (token and position embeddings, LayerNorms, causal multi-head attention, an MLP, a
head) is trained for two steps by 2 or 4 processes, each with its own, uneven, Poisson-style shard
of the batch (one rank's shard empty in a step), through DistributedDataParallel and through FSDP2
(``fully_shard`` per block and at the root, sizes chosen so that shards are uneven and some empty).
What each test proves:

- the update every rank applies equals the one-process update on the union batch, noise included
  (same seed), to float32 rounding of the sum — flat, automatic, group-wise and per-layer clipping,
  gradient accumulation, a head tied to the token embedding, an unsharded root; under bf16 mixed
  precision to bf16 rounding of the clipped sums; with σ = 0 it equals a float64 per-example loop
  (``oracle.token_model_per_example_grads``);
- ``noise_only_step`` on every rank gives the one-process noise bit for bit: each rank draws only its
  own elements (FSDP2: its shard, at the shard's offset in the unsharded parameter), and the sum is
  exactly the one draw;
- no unclipped gradient is ever reduced: the loss is scaled by 10⁶, so any unclipped per-example
  gradient is huge, and every tensor reduced by any collective (our all-reduces and reduce-scatters,
  FSDP2's) is checked against the clipped bound; DDP's reducer never runs (a comm hook counts it);
  under flat clipping FSDP2 reduces nothing itself;
- a failure on one rank (a NaN example) refuses the step on every rank, under every engine, within a
  timeout (no hang);
- configurations that could release an unclipped gradient are refused by name.

Every multi-process run is bounded by a timeout: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import inspect
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import dpkernels

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

V, T, D, HEADS, MLP = 7, 5, 6, 2, 10  # d₀ of 7, 6, 10, 18 rows: uneven shards on 2 and 4 ranks, empty ones on 4
B = 9  # the union batch of each step
SEED = 20251206
TIMEOUT_S = 150
# rows of the union batch each rank holds, per step (uneven; one rank empty in step 1)
SPLITS = {
    2: [(slice(0, 6), slice(6, 9)), (slice(0, 9), slice(9, 9))],
    4: [(slice(0, 1), slice(1, 5), slice(5, 5), slice(5, 9)), (slice(0, 3), slice(3, 4), slice(4, 8), slice(8, 9))],
}


class LayerScale(nn.Module):
    """A bare trainable vector outside any layer: clipped through the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, layer_scale: bool = False) -> None:
        super().__init__()
        self.ls = LayerScale() if layer_scale else nn.Identity()
        self.ln1 = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, MLP)
        self.proj = nn.Linear(MLP, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.ls(self.proj(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    def __init__(self, n_layer: int = 2, layer_scale: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block(layer_scale) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_model(tied: bool = False, layer_scale: bool = False) -> TinyGPT:
    """With ``tied`` the head's weight is the token embedding (GPT-2's head): one parameter, two layers;
    with ``layer_scale`` every block scales its MLP's output by a bare trainable vector."""
    torch.manual_seed(0)
    model = TinyGPT(layer_scale=layer_scale)
    if tied:
        model.head.weight = model.tok.weight
    return model


def batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(2)]


def loss_fn(logits: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy summed over positions and examples (loss_reduction="sum"), times ``scale``."""
    return scale * F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")


def noise_only(case: dict, step: int) -> bool:
    """Whether every rank takes ``noise_only_step()`` at ``step`` (all of them: no forward runs anywhere)."""
    which = case.get("noise_only", False)
    return which is True or (isinstance(which, tuple) and step in which)


PAD = torch.zeros(1, T, dtype=torch.long)  # public padding rows (ids and targets) for a rank with no examples
SETTINGS = dict(max_grad_norm=0.7, expected_batch_size=8, loss_reduction="sum", seed=SEED, backend="torch")


def private(model: nn.Module, sigma: float, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return dpkernels.make_private(model, opt, noise_multiplier=sigma, **SETTINGS, **kw)


# ------------------------------------------------------------------ in each rank ----------


class CollectiveLog:
    """Every tensor a collective reduces in this process, with who asked (ours / FSDP2 / other)."""

    def __init__(self) -> None:
        self.calls: List[Dict] = []
        self._saved = {}

    def install(self) -> None:
        for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single"):
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))

    def remove(self) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _wrap(self, name, original):
        log = self.calls

        def wrapped(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            sent = tensors[0] if name == "all_reduce" else tensors[-1] if len(tensors) > 1 else tensors[0]
            if name == "reduce_scatter_single":
                sent = kwargs.get("input", sent)
            files = [f.filename for f in inspect.stack()[1:6]]
            who = (
                "dpkernels"
                if any(f"dpkernels{os.sep}" in f for f in files)
                else "fsdp"
                if any(f"distributed{os.sep}fsdp" in f for f in files)
                else "other"
            )
            log.append(
                {
                    "op": name,
                    "who": who,
                    "numel": sent.numel(),
                    "dtype": str(sent.dtype),
                    "max": float(sent.detach().float().abs().max()) if sent.numel() else 0.0,
                }
            )
            return original(*args, **kwargs)

        return wrapped


def wrap_engine(model: nn.Module, engine: str, mp_policy: bool = False, shard_root: bool = True):
    """The model as each engine trains it: DDP, or FSDP2 per block and at the root (converted first)."""
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if engine == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = dpkernels.nn.convert(model)
        kw = {}
        if mp_policy:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kw)
        if shard_root:
            fully_shard(model, **kw)
        return model
    return model  # "plain": make_private(distributed=True)


def full_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter, whole (an FSDP2 shard gathered), keyed by its name in the plain model."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        t = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        out[n.removeprefix("module.")] = t.float().clone()
    return out


def full_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        out[n.removeprefix("module.")] = (g.full_tensor() if isinstance(g, DTensor) else g).float().clone()
    return out


def run_case(case: dict, rank: int, world: int) -> dict:
    engine, sigma = case["engine"], case.get("sigma", 1.5)
    model = make_model(case.get("tied", False), case.get("layer_scale", False))
    model = wrap_engine(model, engine, case.get("mp", False), case.get("shard_root", True))
    kw = {"clipping": case.get("clipping", "flat")}
    if kw["clipping"] == "group":
        kw["groups"] = case["groups"]
    model, opt = private(model, sigma, distributed=(engine == "plain"), **kw)
    hook_calls = []
    if engine == "ddp":

        def count(state, bucket):
            hook_calls.append(bucket.buffer().numel())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, count)
    log = CollectiveLog()
    log.install()
    out = {"params": [], "grads": [], "hook_calls": hook_calls, "collectives": log.calls}
    try:
        for step, (ids, target) in enumerate(batches()):
            rows = SPLITS[world][step][rank]
            micro = case.get("micro", 1)
            cuts = torch.linspace(rows.start, rows.stop, micro + 1).round().long().tolist()
            parts = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
            if noise_only(case, step):
                opt.noise_only_step()
            elif rows.stop == rows.start and engine != "fsdp":
                opt.noise_only_step()
            elif rows.stop == rows.start and micro == 1:  # FSDP2: the collectives run on public padding rows
                opt.noise_only_step(closure=lambda: loss_fn(model(PAD), PAD))
            else:  # every rank runs ``micro`` forwards and backwards: FSDP2's collectives must match
                for k, part in enumerate(parts):
                    if part.stop > part.start:
                        loss_fn(model(ids[part]), target[part], case.get("scale", 1.0)).backward()
                    else:
                        opt.mark_padding()
                        loss_fn(model(PAD), PAD).backward()
                    if k + 1 < len(parts):
                        opt.accumulate()
                opt.step()
            out["grads"].append(full_grads(model))
            out["params"].append(full_params(model))
            if case.get("zero_grad", True):
                opt.zero_grad()
    finally:
        log.remove()
    return out


def run_failure(case: dict, rank: int, world: int) -> dict:
    """Rank 1's examples turn NaN in one step: every rank must refuse that step, and nobody moves; the
    next step then goes through on every rank (no stale state, no collective left behind)."""
    engine = case["engine"]
    model = wrap_engine(make_model(), engine)
    model, opt = private(model, 1.0, distributed=(engine == "plain"), clipping=case.get("clipping", "flat"))
    ids, target = batches()[0]
    rows = SPLITS[world][0][rank]
    loss_fn(model(ids[rows]), target[rows]).backward()  # a first step, so that the probe is behind us
    opt.step()
    opt.zero_grad()
    before = full_params(model)
    handle = model.register_forward_hook(lambda m, a, o: o * float("nan")) if rank == 1 else None
    loss_fn(model(ids[rows]), target[rows]).backward()
    out = {"before": before}
    try:
        opt.step()
    except (RuntimeError, FloatingPointError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    if handle is not None:
        handle.remove()
    opt.zero_grad()
    out["params"] = full_params(model)
    loss_fn(model(ids[rows]), target[rows]).backward()
    opt.step()
    out["after"] = full_params(model)
    return out


def refusal(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no refusal"


def run_refusals(case: dict, rank: int, world: int) -> dict:
    """Configurations that could reduce an unclipped gradient or scale the clipped sum, refused by name."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    out = {}
    # layers converted after fully_shard: FSDP2 would gather into the replaced modules
    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    out["converted_after_sharding"] = refusal(lambda: private(model, 1.0))
    # a shard that is not one contiguous range of elements
    model = dpkernels.nn.convert(make_model())
    fully_shard(model, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else None)
    out["shard_1"] = refusal(lambda: private(model, 1.0))
    # a sharded trainable parameter outside any DP layer (its gradient would be reduced unclipped)
    model = wrap_engine(make_model(layer_scale=True), "fsdp")
    out["outside_dp_layers"] = refusal(lambda: private(model, 1.0, fallback=False))
    # FSDP2 told to average (or scale) after make_private: the reduced sum is no longer the clipped sum
    model = wrap_engine(make_model(), "fsdp")
    model, opt = private(model, 1.0)
    model.set_gradient_divide_factor(float(world))
    ids, target = batches()[0]
    rows = SPLITS[world][0][rank]
    loss_fn(model(ids[rows]), target[rows]).backward()
    out["divide_factor"] = refusal(opt.step)
    # DDP's own gradient all-reduce switched back on
    model, opt = private(wrap_engine(make_model(), "ddp"), 1.0)
    model.require_backward_grad_sync = True
    loss_fn(model(ids[rows]), target[rows]).backward()
    out["ddp_sync_on"] = refusal(opt.step)
    # a gradient reaching an unsharded parameter outside its DP layer (it would be reduced unclipped)
    model = wrap_engine(make_model(), "fsdp")
    model, opt = private(model, 1.0)

    def leak():
        logits = model(ids[rows])
        (loss_fn(logits, target[rows]) + logits.sum() * 0 + model.ln_f.weight.sum()).backward()

    out["gradient_outside_layer"] = refusal(leak)
    return out


def _worker(rank: int, world: int, rendezvous: str, cases: dict, out_dir: str) -> None:
    if os.path.exists("/sys/class/net/lo"):  # loopback only: gloo would bind the host name's address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = {}
    try:
        for name, case in cases.items():
            runner = run_failure if case.get("failure") else run_refusals if case.get("refusals") else run_case
            try:
                results[name] = runner(case, rank, world)
            except Exception:
                results[name] = {"exception": traceback.format_exc()}
                raise
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def spawn(cases: dict, world: int, tmp_path: Path) -> List[dict]:
    """Run ``cases`` on ``world`` processes (loopback, gloo); fail, killing them, after TIMEOUT_S."""
    ctx = mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "rendezvous"), cases, str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} processes did not finish within {TIMEOUT_S} s (a hang)")
    except mp.ProcessRaisedException:
        pass  # the rank's traceback is in its results, reported below
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r, res in enumerate(results):
        for name, out in res.items():
            assert "exception" not in out, f"rank {r}, case {name}:\n{out['exception']}"
    return results


# ------------------------------------------------------------------ the one process -------


def one_process(case: dict, world: int) -> dict:
    """The same steps in one process on the union batch of each step (the oracle of every rank)."""
    model = make_model(case.get("tied", False), case.get("layer_scale", False))
    model, opt = private(
        model,
        case.get("sigma", 1.5),
        clipping=case.get("clipping", "flat"),
        **({"groups": case["groups"]} if case.get("clipping") == "group" else {}),
    )
    out = {"params": [], "grads": []}
    for step, (ids, target) in enumerate(batches()):
        rows = [r for r in SPLITS[world][step] if r.stop > r.start]
        union = torch.cat([torch.arange(r.start, r.stop) for r in rows])
        if noise_only(case, step):
            opt.noise_only_step()
        else:
            loss_fn(model(ids[union]), target[union], case.get("scale", 1.0)).backward()
            opt.step()
        out["grads"].append({n: p.grad.float().clone() for n, p in model.named_parameters()})
        out["params"].append({n: p.detach().float().clone() for n, p in model.named_parameters()})
        opt.zero_grad()
    return out


def assert_same(ranks: List[dict], expected: dict, what: str, rtol: float, atol: float, exact: bool = False) -> None:
    for r, res in enumerate(ranks):
        for step in range(2):
            for key in ("grads", "params"):
                got, want = res[key][step], expected[key][step]
                assert set(got) == set(want)
                for n in want:
                    if exact:
                        assert torch.equal(got[n], want[n]), f"{what}: rank {r} step {step} {key} {n}"
                    else:
                        where = f"{what}: rank {r} step {step} {key} {n}"
                        torch.testing.assert_close(
                            got[n], want[n], rtol=rtol, atol=atol, msg=lambda m, where=where: f"{where}: {m}"
                        )


def _block(i: int) -> List[str]:
    return [f"blocks.{i}.{n}" for n in ("ln1", "attn", "attn.out_proj", "ln2", "fc", "proj")]


GROUPS = [["tok", "pos"], _block(0), _block(1) + ["ln_f", "head"]]

TWO_RANK_CASES = {
    "ddp_flat": {"engine": "ddp"},
    "ddp_noise_only": {"engine": "ddp", "noise_only": True, "sigma": 3.0},
    "plain_per_layer": {"engine": "plain", "clipping": "per_layer"},
    "fsdp_flat": {"engine": "fsdp"},
    "fsdp_per_layer": {"engine": "fsdp", "clipping": "per_layer"},
    "fsdp_automatic_accumulate": {"engine": "fsdp", "clipping": "automatic", "micro": 2},
    "fsdp_group": {"engine": "fsdp", "clipping": "group", "groups": GROUPS},
    "fsdp_per_layer_accumulate": {"engine": "fsdp", "clipping": "per_layer", "micro": 2},
    "fsdp_noise_only": {"engine": "fsdp", "noise_only": True, "sigma": 3.0},
    "fsdp_root_unsharded": {"engine": "fsdp", "shard_root": False},
    "fsdp_tied_flat": {"engine": "fsdp", "tied": True},
    "fsdp_tied_per_layer": {"engine": "fsdp", "tied": True, "clipping": "per_layer"},
    # a step whose noise is all there is, after a step whose clipped sums FSDP2 reduced into the shards,
    # without zero_grad() in between: the step before must not leak into it
    "fsdp_per_layer_then_noise_only": {
        "engine": "fsdp",
        "clipping": "per_layer",
        "noise_only": (1,),
        "zero_grad": False,
    },
    "fsdp_per_layer_no_zero_grad": {"engine": "fsdp", "clipping": "per_layer", "zero_grad": False},
    # a bare parameter (a layer-scale vector) clipped through the torch.func fallback, inside a sharded unit
    "fsdp_fallback_flat": {"engine": "fsdp", "layer_scale": True},
    "fsdp_fallback_per_layer": {"engine": "fsdp", "layer_scale": True, "clipping": "per_layer"},
    # σ = 0 and the loss scaled by 10⁶: every unclipped per-example gradient is huge
    "proof_plain": {"engine": "plain", "sigma": 0.0, "scale": 1e6},
    "proof_ddp": {"engine": "ddp", "sigma": 0.0, "scale": 1e6},
    "proof_fsdp_flat": {"engine": "fsdp", "sigma": 0.0, "scale": 1e6},
    "proof_fsdp_per_layer": {"engine": "fsdp", "sigma": 0.0, "scale": 1e6, "clipping": "per_layer"},
}
FOUR_RANK_CASES = {
    "ddp_flat": {"engine": "ddp"},
    "fsdp_flat": {"engine": "fsdp"},
    "fsdp_per_layer": {"engine": "fsdp", "clipping": "per_layer"},
    "fsdp_noise_only": {"engine": "fsdp", "noise_only": True, "sigma": 3.0},
    # bf16 parameters in forward and backward, float32 reduction: the noise (σC/B̄ = 0.35 per element) is
    # exact, the clipped sums carry bf16 rounding
    "fsdp_mixed_precision_flat": {"engine": "fsdp", "mp": True, "sigma": 4.0},
    "fsdp_mixed_precision_per_layer": {"engine": "fsdp", "mp": True, "sigma": 4.0, "clipping": "per_layer"},
}
FAILURE_CASES = {
    "plain": {"failure": True, "engine": "plain"},
    "ddp": {"failure": True, "engine": "ddp"},
    "fsdp_flat": {"failure": True, "engine": "fsdp"},
    "fsdp_per_layer": {"failure": True, "engine": "fsdp", "clipping": "per_layer"},
    "refusals": {"refusals": True},
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn(TWO_RANK_CASES, 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return spawn(FOUR_RANK_CASES, 4, tmp_path_factory.mktemp("four"))


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    return spawn(FAILURE_CASES, 2, tmp_path_factory.mktemp("fail"))


TOLERANCE = dict(rtol=2e-5, atol=2e-6)  # float32 rounding of a sum taken in another order


@pytest.mark.parametrize("name", [n for n, c in TWO_RANK_CASES.items() if c.get("noise_only") is not True])
def test_two_ranks_take_the_one_process_step(two_ranks, name):
    """Uneven shards of the batch (rank 1's empty in step 2), two steps, noise included."""
    assert_same([r[name] for r in two_ranks], one_process(TWO_RANK_CASES[name], 2), name, **TOLERANCE)


@pytest.mark.parametrize("name", ["ddp_flat", "fsdp_flat", "fsdp_per_layer"])
def test_four_ranks_take_the_one_process_step(four_ranks, name):
    """Four ranks on uneven batch shards (one empty in step 1) and parameter shards (LayerNorm's 6 rows
    as 2, 2, 2, 0; the embedding's 7 as 2, 2, 2, 1)."""
    assert_same([r[name] for r in four_ranks], one_process(FOUR_RANK_CASES[name], 4), name, **TOLERANCE)


@pytest.mark.parametrize("world,name", [(2, "ddp_noise_only"), (2, "fsdp_noise_only"), (4, "fsdp_noise_only")])
def test_noise_is_the_one_process_noise_bit_for_bit(two_ranks, four_ranks, world, name):
    """Each rank draws only its own elements (FSDP2: its shard, at its offset in the unsharded parameter);
    the reduced sum is exactly the one-process draw."""
    ranks = two_ranks if world == 2 else four_ranks
    cases = TWO_RANK_CASES if world == 2 else FOUR_RANK_CASES
    assert_same([r[name] for r in ranks], one_process(cases[name], world), name, 0, 0, exact=True)


@pytest.mark.parametrize("name", ["fsdp_mixed_precision_flat", "fsdp_mixed_precision_per_layer"])
def test_mixed_precision(four_ranks, name):
    """MixedPrecisionPolicy(bf16 parameters, float32 reduce): the step is the one-process float32 step up to
    bf16 rounding of the clipped sums (measured: 7e-4 flat, 1.4e-3 per-layer; allowed 5e-3, where a
    missing or doubled noise would be ~0.35 per element)."""
    assert_same([r[name] for r in four_ranks], one_process(FOUR_RANK_CASES[name], 4), name, rtol=0, atol=5e-3)


@pytest.mark.parametrize("name", ["proof_plain", "proof_ddp", "proof_fsdp_flat", "proof_fsdp_per_layer"])
def test_no_unclipped_gradient_is_ever_reduced(two_ranks, name):
    """The loss is scaled by 10⁶: an unclipped per-example gradient has entries ~10⁵, a clipped sum at most
    n_local·C/B̄ < 1. Every tensor any collective reduced is bounded by that; DDP's reducer never ran."""
    bound = 9 * SETTINGS["max_grad_norm"] / SETTINGS["expected_batch_size"]
    for r, res in enumerate(two_ranks):
        out = res[name]
        assert out["hook_calls"] == [], f"rank {r}: DDP's reducer all-reduced gradients"
        reduced = [c for c in out["collectives"] if c["op"] != "all_reduce" or c["numel"] > 1]
        assert reduced, "no clipped sum was reduced at all"
        for c in out["collectives"]:
            assert c["max"] <= max(bound, 1.0), f"rank {r}: {c} reduced a tensor larger than any clipped sum"
            assert c["who"] in ("dpkernels", "fsdp"), c
        by_fsdp = [c for c in reduced if c["who"] == "fsdp"]
        if name == "proof_fsdp_per_layer":
            assert by_fsdp, "per-layer clipping hands FSDP2 the clipped sums to reduce-scatter in backward"
        else:
            assert not by_fsdp, f"rank {r}: FSDP2 reduced gradients itself under {name}"
    assert_same([r[name] for r in two_ranks], one_process(TWO_RANK_CASES[name], 2), name, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["proof_ddp", "proof_fsdp_flat"])
def test_noise_free_step_matches_float64_per_example_loop(two_ranks, name):
    """σ = 0: the reduced gradient is Σ_i min(1, C/‖g_i‖) g_i / B̄ over the union batch, g_i from torch.func."""
    from oracle import flat_clipped_mean, token_model_per_example_grads

    ids, target = batches()[0]
    per_example = token_model_per_example_grads(make_model(), ids, target, "ce")
    scale = TWO_RANK_CASES[name]["scale"]
    expected, _ = flat_clipped_mean(
        {n: g * scale for n, g in per_example.items()}, SETTINGS["max_grad_norm"], SETTINGS["expected_batch_size"]
    )
    for r, res in enumerate(two_ranks):
        for n, g in expected.items():
            torch.testing.assert_close(
                res[name]["grads"][0][n].double(),
                g,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, where=f"rank {r} {n}": f"{where}: {m}",
            )


@pytest.mark.parametrize("name", ["plain", "ddp", "fsdp_flat", "fsdp_per_layer"])
def test_a_failure_on_one_rank_refuses_the_step_on_all(failures, name):
    rank0, rank1 = (f[name] for f in failures)
    assert rank1["error"].startswith("FloatingPointError: non-finite per-example gradient norm"), rank1["error"]
    assert "failed on another rank" in rank0["error"], rank0["error"]
    for res in (rank0, rank1):
        for n, p in res["before"].items():
            assert torch.equal(res["params"][n], p), f"{n} moved in a refused step"
    for n in rank0["after"]:  # and the next step went through, the same on both ranks
        assert torch.equal(rank0["after"][n], rank1["after"][n])
        assert not torch.equal(rank0["after"][n], rank0["params"][n])


@pytest.mark.parametrize(
    "what,message",
    [
        ("converted_after_sharding", "Call dpkernels.nn.convert(model) first, then fully_shard"),
        ("shard_1", "not Shard(0)"),
        ("outside_dp_layers", "LayerScale 'blocks.0.ls' (gamma): no per-example clipping path"),
        ("divide_factor", "no longer reduces by plain summation"),
        ("ddp_sync_on", "gradient synchronisation was switched back on"),
        ("gradient_outside_layer", "received a gradient outside its DP layer"),
    ],
)
def test_refusals(failures, what, message):
    for res in failures:
        assert message in res["refusals"][what], res["refusals"][what]


def test_data_parallel_is_refused():
    with pytest.raises(ValueError, match="does not support nn.DataParallel"):
        private(nn.DataParallel(make_model()), 1.0)
