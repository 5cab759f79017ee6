"""Counter-based Gaussian noise: Philox-4x32-10 and the counter scheme every backend shares.

One definition, four implementations that must agree bit for bit on the integers:
this torch reference (int64 arithmetic, masks to 32 bits), the Triton helpers in
``dpkernels/ops/_triton.py``, the CUDA header ``csrc/philox.cuh`` and the compiled CPU kernel
``csrc/philox_cpu.cpp`` (which includes that header).

Counter scheme
--------------
A draw is named by a 64-bit ``seed`` (the Philox key) and the flat, row-major index ``e`` of
the element inside its parameter tensor. Elements come in pairs of consecutive indices,
j = e >> 1, and each pair is one 128-bit Philox counter

    c0 = j, low 32 bits      c1 = j, high 32 bits      c2 = step      c3 = stream

(stream: one per parameter tensor). Philox is a bijection of the counter for a fixed key, so
two pairs that differ in (j, step, stream) never share a draw; a run is reproducible from
``seed``.

Box-Muller turns three of the four 32-bit outputs (x0, x1, x2, x3) into the pair's normals,
the radius from a 64-bit uniform (x0 its high word, x1 its low word):

    u = x0·2^-32 + (x1·2^-64 + 2^-65)        R = sqrt(-2 ln u),  θ = 2π·x2·2^-32
    z[2j] = R cos θ,   z[2j+1] = R sin θ                                   (x3 is unused)

in float32, every operation rounded to nearest (the products by powers of two are exact).

Why 64 bits for the radius. A sampler reaches radii up to sqrt(-2 ln u_min) only: with a
32-bit uniform (u_min = 2^-33) that is 6.76 standard deviations, and the noise is a Gaussian
truncated there. Truncation matters for privacy: a neighbouring dataset may shift one
coordinate of the clipped sum by the whole sensitivity C, i.e. s = 1/σ noise standard
deviations, and outputs near the truncation edge then occur under one dataset and never under
the other. Such an output needs the pair's radius beyond R_max − s, which has probability
exp(−(R_max − s)²/2): an additive δ per step that the Gaussian accountant does not see
(``truncation_delta``). With R_max = 6.76 it is 6e-8 at σ = 1 and 1e-5 at σ = 0.5, so over
10⁴ steps it would exceed a target δ of 1e-5. With the 64-bit uniform (u_min = 2^-65)
R_max = 9.49 and it is 2e-16 at σ = 1, 6e-13 at σ = 0.5. The price is one Philox call per
two elements instead of four: integer work in the GEMM epilogue. (Like every floating-point
sampler, this one has a discrete support; attacks on that, in the style of Mironov 2012, are
not addressed here.)
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from ._phases import phase

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
TWO_PI = 6.283185307179586
INV_2_32 = 2.3283064365386963e-10  # 2^-32
INV_2_64 = 5.421010862427522e-20  # 2^-64
HALF_INV_2_64 = 2.710505431213761e-20  # 2^-65
MAX_RADIUS = math.sqrt(-2.0 * math.log(HALF_INV_2_64))  # 9.49: no draw lies farther from 0


@dataclass(frozen=True)
class PhiloxKey:
    """Names one block of counters: the draws of one parameter tensor at one step.

    ``seed`` is the 64-bit Philox key, ``step`` and ``stream`` fill counter words c2 and c3
    (both must fit in 32 bits). The engine uses step = optimizer step, stream = parameter index.
    """

    seed: int
    step: int = 0
    stream: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"PhiloxKey.seed must be in [0, 2**64), got {self.seed}")
        for name in ("step", "stream"):
            v = getattr(self, name)
            if not 0 <= v < 2**32:
                raise ValueError(f"PhiloxKey.{name} must be in [0, 2**32), got {v}")

    @property
    def seed_lo(self) -> int:
        return self.seed & MASK32

    @property
    def seed_hi(self) -> int:
        return (self.seed >> 32) & MASK32

    def next_stream(self) -> "PhiloxKey":
        """The key of stream + 1, where a weight's bias draws its noise (linear and conv layers)."""
        if self.stream == 2**32 - 1:
            raise ValueError("the bias draws from stream + 1: the weight's stream must be below 2**32 - 1")
        return PhiloxKey(self.seed, self.step, self.stream + 1)

    def as_tensor(self) -> torch.Tensor:
        """The key as an int64 CPU tensor [seed_lo, seed_hi, step, stream]: the form the dpkernels
        operators take (``dpkernels/ops/_library.py``), which a compiled graph reads when it runs."""
        return torch.tensor([self.seed_lo, self.seed_hi, self.step, self.stream], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, key: torch.Tensor) -> "PhiloxKey":
        """The key an ``as_tensor`` tensor holds (read on the host: keep key tensors on the CPU)."""
        check_key_tensor(key)
        lo, hi, step, stream = (int(v) for v in key.tolist())
        for name, v in (("seed_lo", lo), ("seed_hi", hi)):
            if not 0 <= v < 2**32:
                raise ValueError(f"a key tensor's {name} must be in [0, 2**32), got {v}")
        return cls((hi << 32) | lo, step, stream)


def check_key_tensor(key: torch.Tensor) -> torch.Tensor:
    """Refuse a tensor that is not an int64 key [seed_lo, seed_hi, step, stream]."""
    if key.dtype != torch.int64 or tuple(key.shape) != (4,):
        raise ValueError(
            f"a key tensor is int64 [seed_lo, seed_hi, step, stream] of shape (4,), got {key.dtype} {tuple(key.shape)}"
        )
    return key


def resolve_key(generator: "PhiloxKey | torch.Generator | torch.Tensor | None") -> "PhiloxKey | torch.Tensor":
    """Turn the ``generator`` argument of the functional API into a PhiloxKey.

    - ``PhiloxKey``: used as is (the caller owns the counter scheme, as the engine does).
    - ``torch.Generator``: a fresh 64-bit key is drawn from it (step = stream = 0), so
      calls with a seeded generator are reproducible.
    - ``None``: a fresh key from the operating system's CSPRNG. Never torch's default
      generator: its seed is a fixed constant unless the user sets one, so noise drawn
      from it would be predictable.
    - an int64 tensor [seed_lo, seed_hi, step, stream] (``PhiloxKey.as_tensor``): that key. For
      compiled code: a key tensor is read when the graph runs, so neither the step's counter nor
      the secret seed becomes a constant of the graph.

    While torch.compile traces, the result is the key as a tensor: the key of a ``PhiloxKey`` (its
    ints are guarded like any Python value the graph depends on), a tensor key as it is, and for
    ``None`` or a ``torch.Generator`` a fresh key drawn outside the graph at every call, never a
    constant baked into it.
    """
    if torch.compiler.is_compiling():
        if isinstance(generator, torch.Tensor):
            return check_key_tensor(generator)
        if isinstance(generator, PhiloxKey):
            return generator.as_tensor()
        return _fresh_key_tensor(generator)
    if isinstance(generator, PhiloxKey):
        return generator
    if generator is None:
        return PhiloxKey(secrets.randbits(64))
    if isinstance(generator, torch.Generator):
        hi = int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64))
        lo = int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64))
        return PhiloxKey((hi << 32) | lo)
    if isinstance(generator, torch.Tensor):
        return PhiloxKey.from_tensor(generator)
    raise TypeError(
        "generator must be a dpkernels PhiloxKey, a torch.Generator, an int64 key tensor or None, got "
        f"{type(generator).__name__}"
    )


@torch.compiler.disable
def _fresh_key_tensor(generator: "torch.Generator | None") -> torch.Tensor:
    """A fresh key drawn at run time, outside any compiled graph, as a key tensor."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a dpkernels PhiloxKey, a torch.Generator, an int64 key tensor or None, got "
            f"{type(generator).__name__}"
        )
    return resolve_key(generator).as_tensor()


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2^32, b < 2^32: the product fits in 64 bits unsigned; int64 wraps, but bits are right.
    prod = b * a
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference Philox-4x32-10 on int64 tensors holding uint32 values."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _box_muller(x_hi: torch.Tensor, x_lo: torch.Tensor, x_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R cos θ, R sin θ) with R from the 64-bit uniform (x_hi, x_lo) and θ from x_angle."""
    u = x_hi.to(torch.float32) * INV_2_32 + (x_lo.to(torch.float32) * INV_2_64 + HALF_INV_2_64)
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = TWO_PI * (x_angle.to(torch.float32) * INV_2_32)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def philox_normal(numel: int, key: PhiloxKey, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """float32 standard normals for elements offset .. offset+numel-1 of the counter block ``key``
    (reference). Element e is half e & 1 of pair e >> 1 whatever the offset, so a range drawn with
    an offset is exactly that slice of the whole draw (an odd offset starts mid-pair): a rank can
    draw the noise of its own shard of a parameter alone."""
    with phase("dpkernels.noise"):
        return _philox_normal(numel, key, device, offset)


def check_offset(offset: int, numel: int) -> int:
    """``offset`` as an int, refused unless 0 <= offset and offset + numel fits the 64-bit pair counter."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + numel > 2**64:
        raise ValueError(f"offset must be in [0, 2**64 - numel], got {offset} (numel {numel})")
    return offset


def _philox_normal(numel: int, key: PhiloxKey, device: torch.device | str, offset: int = 0) -> torch.Tensor:
    offset = check_offset(offset, numel)
    first = offset >> 1  # the pair holding element ``offset``
    pair = torch.arange((offset + numel + 1) // 2 - first, dtype=torch.int64, device=device)
    if first:  # pair indices are below 2^63 (offset + numel <= 2^64): int64 holds them
        pair = pair + first
    c2 = torch.full_like(pair, key.step)
    c3 = torch.full_like(pair, key.stream)
    x0, x1, x2, _ = philox4x32_10(pair & MASK32, (pair >> 32) & MASK32, c2, c3, key.seed_lo, key.seed_hi)
    z0, z1 = _box_muller(x0, x1, x2)
    start = offset & 1
    return torch.stack([z0, z1], dim=1).reshape(-1)[start : start + numel]


def _cpu_kernel() -> bool:
    """Whether the compiled CPU kernel (csrc/philox_cpu.cpp, ``dpkernels._cpu``) draws CPU noise here."""
    from .. import _cpu

    return _cpu.available()


def normal(numel: int, key: PhiloxKey, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """``philox_normal``'s draws as fast as this machine has them: the compiled CPU kernel for CPU
    tensors where it is available (integers bit for bit, normals within a float32 ulp or two of the
    reference, and bit for bit those of the CUDA kernels), the reference otherwise. ``offset``: the
    first element's index in the whole draw (``philox_normal``)."""
    device = torch.device(device)
    if device.type == "cpu" and numel > 0 and _cpu_kernel():
        from .. import _cpu

        with phase("dpkernels.noise"):
            return _cpu.philox_normal(numel, key, check_offset(offset, numel))
    return philox_normal(numel, key, device, offset)


def add_normal_(out: torch.Tensor, std: float, key: PhiloxKey) -> torch.Tensor:
    """out += std·z over out's flat elements, z = ``normal(out.numel(), key)``: in place (out a
    contiguous float32 tensor). The product, then the sum, each rounded, as ``out + std * z``."""
    if out.device.type == "cpu" and out.is_contiguous() and out.dtype == torch.float32 and _cpu_kernel():
        from .. import _cpu

        with phase("dpkernels.noise"):
            return _cpu.add_normal_(out, std, key)
    return out.add_(std * philox_normal(out.numel(), key, out.device).view(out.shape))


def truncation_delta(noise_multiplier: float) -> float:
    """The per-step δ of the sampler's finite tail when a neighbour moves one coordinate by C.

    exp(−(MAX_RADIUS − 1/σ)²/2): the probability that a pair of draws has radius beyond
    MAX_RADIUS − 1/σ, which an output must have to be reachable under one of two neighbouring
    datasets and not the other (see the module docstring). Add it to δ per step, or check that
    steps · truncation_delta(σ) is negligible against the target δ.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    reach = max(MAX_RADIUS - 1.0 / noise_multiplier, 0.0)
    return math.exp(-0.5 * reach * reach)
