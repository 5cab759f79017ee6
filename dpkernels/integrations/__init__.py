"""Adapters between dpkernels and other libraries, imported on demand only.

- ``opacus``: dpkernels' fused norms inside Opacus' ghost clipping (``use_fused_norms``).
- ``transformers``, ``timm``: DP layers for the layer classes of Hugging Face transformers and
  timm, registered in ``dpkernels.nn.registry``. ``convert`` / ``make_private`` load them by
  themselves when the library is already imported (a model of its classes exists only then); the
  core never imports transformers or timm.
"""

from __future__ import annotations

import importlib
import sys

# library -> the integration module that registers its layers
_LAYER_INTEGRATIONS = {
    "transformers": "dpkernels.integrations.transformers",
    "timm": "dpkernels.integrations.timm",
}


def load_available() -> list:
    """Import the layer integrations of the libraries this process has imported; their names."""
    loaded = []
    for library, module in _LAYER_INTEGRATIONS.items():
        if library in sys.modules:
            importlib.import_module(module)
            loaded.append(library)
    return loaded
