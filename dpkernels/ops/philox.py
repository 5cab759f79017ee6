"""Counter-based Gaussian noise: Philox-4x32-10 and the counter scheme every backend shares.

One definition, three implementations that must agree bit for bit on the integers:
this torch reference (int64 arithmetic, masks to 32 bits), the Triton helper in
``dpkernels/ops/philox_triton.py`` and the CUDA header ``csrc/philox.cuh``.

Counter scheme
--------------
A draw is named by a 64-bit ``seed`` (the Philox key) and the flat, row-major index ``e`` of
the element inside its parameter tensor. Elements come in groups of four consecutive
indices, j = e >> 2, and each group is one 128-bit Philox counter

    c0 = j, low 32 bits      c1 = j, high 32 bits      c2 = step      c3 = stream

(stream: one per parameter tensor). Philox is a bijection of the counter for a fixed key, so
two groups that differ in (j, step, stream) never share a draw, and inside a group each of
the four outputs serves one element; a run is reproducible from ``seed``.

Box-Muller turns the four 32-bit outputs (x0, x1, x2, x3) into the group's four normals:

    R_a = sqrt(-2 ln(x0·2^-32 + 2^-33)),  θ_a = 2π·x1·2^-32     z[4j]   = R_a cos θ_a
                                                                z[4j+1] = R_a sin θ_a
    R_b = sqrt(-2 ln(x2·2^-32 + 2^-33)),  θ_b = 2π·x3·2^-32     z[4j+2] = R_b cos θ_b
                                                                z[4j+3] = R_b sin θ_b

in float32 (u = x·2^-32 + 2^-33 lies in (0, 1], so the log is finite). The tail reaches
sqrt(2·33 ln 2) ≈ 6.8 standard deviations. One Philox call per four elements, and one log
and one square root per two, is what makes the noise cheap enough for a GEMM epilogue.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
TWO_PI = 6.283185307179586
INV_2_32 = 2.3283064365386963e-10  # 2^-32
HALF_INV_2_32 = 1.1641532182693481e-10  # 2^-33


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


def resolve_key(generator: "PhiloxKey | torch.Generator | None") -> PhiloxKey:
    """Turn the ``generator`` argument of the functional API into a PhiloxKey.

    - ``PhiloxKey``: used as is (the caller owns the counter scheme, as the engine does).
    - ``torch.Generator``: a fresh 64-bit key is drawn from it (step = stream = 0), so
      calls with a seeded generator are reproducible.
    - ``None``: a fresh key from the operating system's CSPRNG. Never torch's default
      generator: its seed is a fixed constant unless the user sets one, so noise drawn
      from it would be predictable.
    """
    if isinstance(generator, PhiloxKey):
        return generator
    if generator is None:
        return PhiloxKey(secrets.randbits(64))
    if isinstance(generator, torch.Generator):
        hi = int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64))
        lo = int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64))
        return PhiloxKey((hi << 32) | lo)
    raise TypeError(
        f"generator must be a dpkernels PhiloxKey, a torch.Generator or None, got {type(generator).__name__}"
    )


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


def _box_muller_pair(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(xa.to(torch.float32) * INV_2_32 + HALF_INV_2_32))
    angle = TWO_PI * (xb.to(torch.float32) * INV_2_32)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def philox_normal(numel: int, key: PhiloxKey, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 standard normals for elements 0..numel-1 of the counter block ``key`` (reference)."""
    group = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    c2 = torch.full_like(group, key.step)
    c3 = torch.full_like(group, key.stream)
    x0, x1, x2, x3 = philox4x32_10(group & MASK32, (group >> 32) & MASK32, c2, c3, key.seed_lo, key.seed_hi)
    z0, z1 = _box_muller_pair(x0, x1)
    z2, z3 = _box_muller_pair(x2, x3)
    return torch.stack([z0, z1, z2, z3], dim=1).reshape(-1)[:numel]
