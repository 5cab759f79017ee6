"""Import timm where no torchvision matches the installed torch (CI: torch 2.13's CPU build).

timm imports torchvision when it is imported (``timm.layers`` takes ``FrozenBatchNorm2d`` from
``torchvision.ops.misc``, ``timm.data`` its transforms), although none of that runs for the
models the tests build. PyPI has no torchvision for a CPU torch: its wheels are CUDA builds whose
operators fail to load beside one, and a newer torchvision pulls a newer (CUDA) torch. So timm
is installed with ``--no-deps`` (README's test command) and, only when torchvision cannot be
imported, ``import_timm`` imports it with a stand-in for torchvision whose every name is a
placeholder that raises if it is used. The stand-in is removed from ``sys.modules`` and
``sys.meta_path`` once timm is imported, so nothing else (transformers checks for torchvision)
sees it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _Placeholder:
    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name} is a test stand-in for torchvision, which is not installed")

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")


class _PlaceholderType(type):
    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{cls.__qualname__}.{attr}")


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        qualname = f"{self.__name__}.{attr}"

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{qualname} is a test stand-in for torchvision, which is not installed")

        cls = _PlaceholderType(attr, (), {"__init__": refuse, "__qualname__": qualname})
        setattr(self, attr, cls)
        return cls


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_timm() -> types.ModuleType:
    """timm, imported (with the torchvision stand-in only if torchvision cannot be imported)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if _torchvision_importable():
        import timm

        return timm
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
        import timm.models.resnet  # noqa: F401
        import timm.models.vision_transformer  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return timm
