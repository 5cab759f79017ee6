"""The ``dpkernels::`` operator library: every kernel entry point as a torch.library custom op, and
the one dispatch table that runs them.

Each op family module (``linear_sq_norms.py``, ``clip_sum_noise.py``, ...) declares its ops with
``kernel_op``: the schema, one implementation per backend (the torch reference, the Triton
kernel, where there is one the CUDA kernel), and a fake implementation that gives the outputs'
shapes and dtypes from the inputs'. The functional API (``dpkernels.functional``) checks its
arguments and ends in one call of the op, which runs it one of two ways:

    eager    the chosen backend's implementation, called directly (``select_backend``, a dict
             lookup, the call): no operator dispatch, which would cost several µs per call
    traced   ``torch.ops.dpkernels.<name>``, an opaque node with its fake implementation, when
             torch.compile or torch.export is tracing (``torch.compiler.is_compiling()``), when a
             Python dispatch mode is active (FakeTensorMode, make_fx, the memory model's byte
             counter) and for meta tensors. The op's own kernel then runs the eager way.

Both ways reach the same implementation, so a compiled graph computes what eager code computes.

Noise keys. An op that draws noise takes its Philox key as an argument named ``key``: a
``PhiloxKey`` in the eager way, an int64 tensor [seed_lo, seed_hi, step, stream]
(``PhiloxKey.as_tensor``) in the traced way, so that a compiled graph reads the counter when it
runs instead of carrying one step's counter in its code (and a key handed in as a tensor keeps
the secret seed out of the graph entirely). Such ops are tagged ``cudagraph_unsafe``: a CUDA
graph would replay the key it was captured with, i.e. the same noise every step.

Optional outputs. A custom op cannot return ``Tensor?``; an implementation returning a tuple with
``None`` entries (a layer without bias) is registered as returning ``Tensor[]`` in which a
0-element tensor stands for ``None``, and ``KernelOp`` turns it back.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from ._backend import select_backend
from .philox import PhiloxKey

NAMESPACE = "dpkernels"

_NO_OUTPUT = (0,)


def traced(first: Any) -> bool:
    """Whether a dpkernels op called now must go through the operator (see the module docstring).
    ``first``: the op's first tensor argument, or the device of a factory op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return first.is_meta if isinstance(first, torch.Tensor) else first.type == "meta"


def _pack(out: Any) -> Any:
    """An implementation's tuple with ``None`` entries as a list with 0-element placeholders."""
    return [t if t is not None else torch.empty(_NO_OUTPUT) for t in out]


def _unpack(out: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    return tuple(t if t.numel() != 0 or t.dim() != 1 else None for t in out)


class KernelOp:
    """One dpkernels op: its implementations per backend, its custom op, and the call that picks
    between running an implementation directly and going through the operator."""

    def __init__(
        self,
        name: str,
        schema: str,
        impls: Dict[str, Callable],
        fake: Callable,
        *,
        key_args: Sequence[int] = (),
        optional_outputs: bool = False,
        device_arg: int = 0,
    ) -> None:
        self.name = name
        self.impls = impls
        self.has_cuda = "cuda" in impls
        self.key_args = tuple(key_args)
        self.optional_outputs = optional_outputs
        self.device_arg = device_arg
        tags = (torch.Tag.cudagraph_unsafe,) if key_args else ()
        self.custom_op = torch.library.custom_op(
            f"{NAMESPACE}::{name}", self._run_op, mutates_args=(), schema=schema, tags=tags
        )
        self.fake = fake
        self.custom_op.register_fake(self._fake(fake))
        self.op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def implementation(self, device: torch.device, backend: Optional[str]) -> Callable:
        """The implementation that runs on ``device`` for ``backend`` (``select_backend``); an op with
        a torch implementation only runs it whatever the backend (its computation is the same
        everywhere: small, or deterministic by construction)."""
        if len(self.impls) == 1:
            return self.impls["torch"]
        return self.impls[select_backend(device, backend, op_has_cuda=self.has_cuda)]

    def __call__(self, *args: Any, backend: Optional[str] = None) -> Any:
        first = args[self.device_arg]
        if traced(first):
            return self._traced(args, backend)
        device = first.device if isinstance(first, torch.Tensor) else first
        return self.implementation(device, backend)(*args)

    # ---- the traced way -------------------------------------------------------------------
    def _traced(self, args: Sequence[Any], backend: Optional[str]) -> Any:
        if self.key_args:
            args = list(args)
            for i in self.key_args:
                if isinstance(args[i], PhiloxKey):
                    args[i] = args[i].as_tensor()
        out = self.op(*args, backend)
        return _unpack(out) if self.optional_outputs else out

    def _run_op(self, *args: Any) -> Any:
        """The custom op's kernel: key tensors back to PhiloxKeys, then the eager way."""
        *args, backend = args
        for i in self.key_args:
            args[i] = PhiloxKey.from_tensor(args[i])
        first = args[self.device_arg]
        device = first.device if isinstance(first, torch.Tensor) else first
        # a factory op for the meta device (its key tensor on the CPU dispatched it here): shapes only
        run = self.fake if device.type == "meta" else self.implementation(device, backend)
        out = run(*args)
        return _pack(out) if self.optional_outputs else out

    def _fake(self, fake: Callable) -> Callable:
        def fake_impl(*args: Any) -> Any:
            out = fake(*args[:-1])
            return _pack(out) if self.optional_outputs else out

        return fake_impl


TABLE: Dict[str, KernelOp] = {}


def kernel_op(
    name: str,
    schema: str,
    *,
    torch: Callable,
    triton: Optional[Callable] = None,
    cuda: Optional[Callable] = None,
    fake: Callable,
    key_args: Sequence[int] = (),
    optional_outputs: bool = False,
    device_arg: int = 0,
) -> KernelOp:
    """Declare the op ``dpkernels::name`` (see the module docstring) and enter it in ``TABLE``.

    ``schema``: the arguments and returns in torch's schema language, without the trailing
    ``str? backend`` every op takes. ``torch``/``triton``/``cuda``: the implementations, each taking
    the schema's arguments (keys as PhiloxKey). ``fake``: the same arguments, outputs of the right
    shape, dtype and device. ``key_args``: positions of Philox keys. ``device_arg``: the argument
    whose device picks the backend (a tensor, or a device for a factory op)."""
    impls = {"torch": torch}
    if triton is not None:
        impls["triton"] = triton
    if cuda is not None:
        impls["cuda"] = cuda
    args, returns = schema.rsplit("->", 1)
    full = f"{args.rstrip()[:-1].rstrip()}, str? backend) -> {returns.strip()}"
    op = KernelOp(name, full, impls, fake, key_args=key_args, optional_outputs=optional_outputs, device_arg=device_arg)
    TABLE[name] = op
    return op
