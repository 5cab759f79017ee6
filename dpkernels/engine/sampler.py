"""Poisson sampling of batches, as the privacy analysis of DP-SGD assumes."""

from __future__ import annotations

import secrets
from typing import Iterator, Optional

import torch


class PoissonSampler:
    """Each step, every one of ``num_samples`` examples joins the batch with probability ``sample_rate``.

    Iterating yields ``steps`` index tensors (int64); a batch may be empty, and its size varies
    around ``sample_rate * num_samples`` (the ``expected_batch_size`` to give make_private).
    Usable as a DataLoader ``batch_sampler`` (lists of indices) through ``as_lists=True``.
    The sampling must stay secret like the noise: without a ``generator`` a fresh one is seeded
    from the OS CSPRNG.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: Optional[torch.Generator] = None,
        as_lists: bool = False,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.as_lists = as_lists
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(secrets.randbits(63))
        self.generator = generator

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_samples))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            idx = mask.nonzero().flatten()
            yield idx.tolist() if self.as_lists else idx
