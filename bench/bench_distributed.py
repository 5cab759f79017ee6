"""The private step on 1, 2 and 4 CPU processes (gloo, loopback): how its cost grows with ranks.

Engines (``make_private``, one data-parallel path, ``dpkernels/engine/distributed.py``):

    distributed      make_private(distributed=True): replicated model, clipped sums all-reduced
    ddp              the model wrapped in DistributedDataParallel: the same path, DDP's process group
    fsdp_flat        FSDP2 (fully_shard per block and at the root), flat clipping: clipped sums
                     reduce-scattered by dpkernels at the step, unit by unit
    fsdp_per_layer   FSDP2, per-layer clipping: each layer clipped inside backward and handed to
                     FSDP2's own reduce-scatter
    ddp_nonprivate, fsdp_nonprivate    the same engines without make_private (the baselines)

The step is the same everywhere: a GPT (``bench/models.py``, all parameters trained) on a fixed
global batch of B examples split evenly over the ranks (strong scaling), SGD, σ = 1. Per
configuration and rank:

    time     the median over --reps steps, after --warmup steps (the first also runs the guard's
             probe), of the slowest rank's step (forward, backward, optimizer.step; a barrier
             before each step)
    memory   the peak bytes of live tensor storages during one more step, above what was live
             before it (every storage an op creates, counted until it is freed: a dispatch mode,
             exact bytes), and the process's peak resident set (``ru_maxrss``) for scale
    comm     the bytes each rank hands to collectives in one step, counted exactly from the
             tensors: all-gather inputs (its shard), reduce-scatter inputs (the padded unsharded
             sums), all-reduce buffers; split by who issued them (FSDP2 itself, or dpkernels)

On a machine with fewer cores than processes the ranks share cores (``--threads`` each): the
times then grow with ranks for that reason too; the result file says how many cores there were.

    python bench/bench_distributed.py            # writes bench/results/distributed-CPU-<date>.{md,json}
    python bench/bench_distributed.py --smoke    # tiny model, 1 and 2 ranks, /tmp
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from bench import common, models  # noqa: E402

MODES = ("distributed", "ddp", "fsdp_flat", "fsdp_per_layer", "ddp_nonprivate", "fsdp_nonprivate")
BASELINE = {
    "distributed": "ddp_nonprivate",
    "ddp": "ddp_nonprivate",
    "fsdp_flat": "fsdp_nonprivate",
    "fsdp_per_layer": "fsdp_nonprivate",
}
CONFIGS = {
    "default": models.GPTConfig(
        vocab=512, seq=32, d_model=128, n_layer=4, n_head=4, d_mlp=512, batch=16, train_all=True
    ),
    "smoke": models.GPTConfig(vocab=61, seq=8, d_model=16, n_layer=2, n_head=2, d_mlp=32, batch=4, train_all=True),
}


class LiveStorageBytes(TorchDispatchMode):
    """Exact bytes of the live tensor storages created by ops under it, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ids: set = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._ids.discard(key)

    def adopt(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if hasattr(t, "to_local"):  # a DTensor: its local tensor holds the storage
            t = t.to_local()
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper without storage of its own
            return
        key = id(storage)
        if key in self._ids:
            return
        n = storage.nbytes()
        self._ids.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.adopt(t)
        return out


class CommBytes:
    """Bytes handed to torch.distributed collectives, by operation and by who issued them."""

    OPS = (
        "all_reduce",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "all_gather_single",
        "all_gather_into_tensor",
        "broadcast",
    )

    def __init__(self) -> None:
        self.bytes: Dict[str, int] = {}
        self.counting = False
        self._saved: Dict[str, Any] = {}

    def install(self) -> None:
        for name in self.OPS:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.counting:
                sent = self._sent(name, args, kwargs)
                files = [f.filename for f in inspect.stack()[1:8]]
                who = (
                    "dpkernels"
                    if any(f"dpkernels{os.sep}" in f for f in files)
                    else "fsdp"
                    if any(f"distributed{os.sep}fsdp" in f for f in files)
                    else "other"
                )
                op = (
                    "reduce_scatter"
                    if name.startswith("reduce_scatter")
                    else "all_gather"
                    if name.startswith("all_gather")
                    else name
                )
                key = f"{who}.{op}"
                self.bytes[key] = self.bytes.get(key, 0) + sent.numel() * sent.element_size()
            return original(*args, **kwargs)

        return wrapped

    @staticmethod
    def _sent(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """The tensor this rank contributes: the buffer (all-reduce, broadcast) or the input."""
        if name in ("all_reduce", "broadcast"):
            return kwargs.get("tensor", args[0] if args else None)
        if name in ("reduce_scatter_single", "all_gather_single"):
            return kwargs.get("input", args[1] if len(args) > 1 else None)
        return kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _wrap_model(model: nn.Module, mode: str) -> nn.Module:
    import dpkernels

    if mode.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model)
    if mode.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard

        if mode != "fsdp_nonprivate":
            model = dpkernels.nn.convert(model)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def _worker(
    rank: int, world: int, rendezvous: str, mode: str, cfg: models.GPTConfig, opts: Dict[str, Any], out_path: str
) -> None:
    import dpkernels

    torch.set_num_threads(opts["threads"])
    if os.path.exists("/sys/class/net/lo"):  # loopback only: gloo would bind the host name's address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    try:
        comm = CommBytes()
        comm.install()
        model = _wrap_model(models.build("gpt", cfg, seed=0, device=torch.device("cpu"), dtype=torch.float32), mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if mode == "ddp_nonprivate":  # DDP's reducer all-reduces from C++: a comm hook counts its buckets
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counted(state, bucket):  # no annotations: DDP checks them, and these would be strings
                if comm.counting:
                    buf = bucket.buffer()
                    sent = buf.numel() * buf.element_size()
                    comm.bytes["ddp.all_reduce"] = comm.bytes.get("ddp.all_reduce", 0) + sent
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counted)
        elif not mode.endswith("nonprivate"):
            model, opt = dpkernels.make_private(
                model,
                opt,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=cfg.batch,
                seed=0,
                backend="torch",
                distributed=(mode == "distributed"),
                clipping="per_layer" if mode == "fsdp_per_layer" else "flat",
            )
        x, y = models.make_batch("gpt", cfg, seed=1, device=torch.device("cpu"), dtype=torch.float32)
        rows = torch.arange(cfg.batch).chunk(world)[rank]  # torch.chunk: every rank gets examples when B >= W
        xr, yr = x[rows], y[rows]

        def step() -> None:
            models.lm_loss(model(xr), yr).backward()
            opt.step()
            opt.zero_grad()

        for _ in range(opts["warmup"]):
            step()
        times: List[float] = []
        for k in range(opts["reps"]):
            comm.counting = k == 0
            dist.barrier()
            t0 = time.perf_counter()
            step()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            comm.counting = False
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed) * 1e3)
        with LiveStorageBytes() as live:
            live.peak = live.live = 0
            step()
        record = {
            "rank": rank,
            "world": world,
            "mode": mode,
            "rows": len(rows),
            "step_ms": statistics.median(times),
            "step_ms_all": times,
            "peak_step_bytes": live.peak,
            "max_rss_bytes": _rss_bytes(),
            "comm_bytes": dict(comm.bytes),
            "param_bytes_local": sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters()
            ),
        }
        Path(out_path).write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def run_config(mode: str, world: int, cfg: models.GPTConfig, opts: Dict[str, Any]) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        mp.start_processes(
            _worker_entry,
            args=(world, os.path.join(tmp, "rendezvous"), mode, cfg, opts, tmp),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [json.loads(Path(o).read_text()) for o in outs]


def _worker_entry(
    rank: int, world: int, rendezvous: str, mode: str, cfg: models.GPTConfig, opts: Dict[str, Any], tmp: str
) -> None:
    _worker(rank, world, rendezvous, mode, cfg, opts, os.path.join(tmp, f"rank{rank}.json"))


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    first = rows[0]
    comm: Dict[str, int] = {}
    for r in rows:
        for k, v in r["comm_bytes"].items():
            comm[k] = max(comm.get(k, 0), v)
    return {
        "mode": first["mode"],
        "world": first["world"],
        "step_ms": first["step_ms"],
        "peak_step_bytes_max": max(r["peak_step_bytes"] for r in rows),
        "peak_step_bytes_per_rank": [r["peak_step_bytes"] for r in rows],
        "max_rss_bytes_max": max(r["max_rss_bytes"] for r in rows),
        "param_bytes_local_max": max(r["param_bytes_local"] for r in rows),
        "comm_bytes_max_rank": comm,
        "ranks": rows,
    }


def render(
    results: List[Dict[str, Any]], cfg: models.GPTConfig, opts: Dict[str, Any], load: Optional[tuple] = None
) -> str:
    base = {r["mode"]: r["step_ms"] for r in results if r["world"] == 1}
    nonprivate = {(r["mode"], r["world"]): r["step_ms"] for r in results if r["mode"].endswith("nonprivate")}
    rows = []
    for r in results:
        comm = r["comm_bytes_max_rank"]
        ours = sum(v for k, v in comm.items() if k.startswith("dpkernels."))
        np_ms = nonprivate.get((BASELINE.get(r["mode"]), r["world"]))
        rows.append(
            [
                r["mode"],
                r["world"],
                f"{r['step_ms']:.1f}",
                f"{r['step_ms'] / base[r['mode']]:.2f}" if r["mode"] in base else "–",
                f"{r['step_ms'] / np_ms:.2f}" if np_ms else "–",
                common.fmt_bytes(r["peak_step_bytes_max"]),
                common.fmt_bytes(r["param_bytes_local_max"]),
                common.fmt_bytes(r["max_rss_bytes_max"]),
                common.fmt_bytes(comm.get("fsdp.all_gather", 0)),
                common.fmt_bytes(comm.get("fsdp.reduce_scatter", 0)),
                common.fmt_bytes(comm.get("dpkernels.reduce_scatter", 0)),
                common.fmt_bytes(comm.get("dpkernels.all_reduce", 0)),
                common.fmt_bytes(ours),
                common.fmt_bytes(comm.get("ddp.all_reduce", 0)),
            ]
        )
    table = common.md_table(
        [
            "engine",
            "ranks",
            "step ms (median, slowest rank)",
            "vs 1 rank",
            "vs non-private",
            "peak tensor bytes in a step (max rank)",
            "parameters held (max rank)",
            "peak RSS (max rank)",
            "FSDP2 all-gather",
            "FSDP2 reduce-scatter",
            "dpkernels reduce-scatter",
            "dpkernels all-reduce",
            "dpkernels total",
            "DDP reducer all-reduce",
        ],
        rows,
    )
    flat_vs_layer = []
    for world in sorted({r["world"] for r in results}):
        by = {r["mode"]: r for r in results if r["world"] == world}
        if "fsdp_flat" in by and "fsdp_per_layer" in by:
            f, p = by["fsdp_flat"], by["fsdp_per_layer"]
            cf, cp = f["comm_bytes_max_rank"], p["comm_bytes_max_rank"]
            rs_f = cf.get("dpkernels.reduce_scatter", 0) + cf.get("fsdp.reduce_scatter", 0)
            rs_p = cp.get("dpkernels.reduce_scatter", 0) + cp.get("fsdp.reduce_scatter", 0)
            flat_vs_layer.append(
                [
                    world,
                    common.fmt_bytes(f["peak_step_bytes_max"] - p["peak_step_bytes_max"]),
                    f"{f['peak_step_bytes_max'] / max(p['peak_step_bytes_max'], 1):.2f}",
                    common.fmt_bytes(rs_f),
                    common.fmt_bytes(rs_p),
                    "at the step (not overlapped)",
                    "in backward (FSDP2, overlapped)",
                    f"{f['step_ms'] / p['step_ms']:.2f}",
                ]
            )
    extra = ""
    if flat_vs_layer:
        extra = "\n\n### FSDP2: flat clipping on top of per-layer clipping\n\n" + common.md_table(
            [
                "ranks",
                "extra peak tensor bytes",
                "peak ratio",
                "reduce-scatter bytes, flat",
                "per-layer",
                "flat reduces",
                "per-layer reduces",
                "step time ratio",
            ],
            flat_vs_layer,
        )
    return (
        f"Model: {cfg.describe()}; SGD, σ = 1, C = 1, expected batch B̄ = {cfg.batch} split evenly over the ranks "
        f"(strong scaling); {opts['warmup']} warm-up steps, median of {opts['reps']}; {opts['threads']} torch "
        f"thread(s) per rank on a {os.cpu_count()}-core machine"
        + (" — 4 ranks oversubscribe it" if (os.cpu_count() or 1) < 4 * opts["threads"] else "")
        + (
            f" (1-minute load average {load[0]:.1f} before the run and {load[1]:.1f} after it, the benchmark's own "
            "processes included; other jobs on the machine slow every rank)"
            if load
            else ""
        )
        + ". Memory: peak bytes of live tensor storages during one step above those live before it (exact bytes, "
        "a dispatch mode over every op); RSS is the whole process (torch itself included). Communication: the bytes "
        "each rank hands to collectives in one step (all-gather: its shard; reduce-scatter: the padded unsharded "
        "sums; all-reduce: the buffer, the ranks' 4-byte agreement flags included); on the wire a ring moves "
        "about (W−1)/W of a reduce-scatter or all-gather buffer and 2(W−1)/W of an "
        "all-reduce buffer per rank.\n\n" + table + extra
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    cfg = CONFIGS["smoke" if args.smoke else "default"]
    worlds = args.worlds or ([1, 2] if args.smoke else [1, 2, 4])
    opts = {"warmup": args.warmup, "reps": args.reps or (2 if args.smoke else 7), "threads": args.threads}
    load_before = os.getloadavg()[0]  # another job on the machine slows every rank: recorded with the results
    results = []
    for world in worlds:
        for mode in args.modes:
            t0 = time.perf_counter()
            results.append(summarize(run_config(mode, world, cfg, opts)))
            print(
                f"{mode:15s} W={world}: {results[-1]['step_ms']:8.1f} ms/step, "
                f"peak {common.fmt_bytes(results[-1]['peak_step_bytes_max'])} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    device = torch.device("cpu")
    env = common.env_record(
        device,
        script="bench_distributed",
        smoke=args.smoke,
        config=models.config_dict(cfg),
        cpu_count=os.cpu_count(),
        loadavg_1min_before=load_before,
        loadavg_1min_after=os.getloadavg()[0],
        **opts,
        **({} if args.smoke else {"device_tag": "CPU"}),
    )
    md = render(results, cfg, opts, (load_before, env["loadavg_1min_after"]))
    written = common.write_results(
        "distributed", device, env, {"results": results}, md, args.out_dir, cpu_results=not args.smoke
    )
    print(md)
    print("written:", *map(str, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
