"""Types of the functional API's arguments."""

from __future__ import annotations

from typing import Union

import torch

from ..ops.philox import PhiloxKey

# the ``generator`` argument of the ops that draw noise (``dpkernels.ops.philox.resolve_key``)
Generator = Union[PhiloxKey, torch.Generator, torch.Tensor, None]
