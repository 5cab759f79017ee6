"""The training history both accountants share, and its (de)serialisation.

A history is a list of segments ``(noise_multiplier, sample_rate, steps)``: ``steps`` steps of
the Poisson-subsampled Gaussian mechanism, each example included in a step's batch
independently with probability ``sample_rate`` and Gaussian noise of standard deviation
``noise_multiplier * clip_norm`` added to the clipped sum. Consecutive segments with the same
(noise_multiplier, sample_rate) are merged, so a training loop may call ``step()`` once per step.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Tuple

from . import _validation as V

STATE_VERSION = 1


class Segment(NamedTuple):
    noise_multiplier: float
    sample_rate: float
    steps: int


class AccountantBase:
    """History bookkeeping; subclasses add the privacy analysis (``epsilon`` / ``delta``)."""

    #: name written into ``state_dict()`` and checked by ``load_state_dict()``
    kind = "base"

    def __init__(self) -> None:
        self._history: List[Segment] = []

    # ------------------------------------------------------------------ history
    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> "AccountantBase":
        """Record ``steps`` steps of the Poisson-subsampled Gaussian mechanism.

        Adjacency is add/remove-one (the standard one for Poisson sampling). Returns ``self``
        so calls can be chained.
        """
        segment = Segment(
            V.check_noise_multiplier(noise_multiplier), V.check_sample_rate(sample_rate), V.check_steps(steps)
        )
        if segment.steps:
            self._history_append(segment)
            self._invalidate()
        return self

    @property
    def history(self) -> Tuple[Segment, ...]:
        """The recorded segments, oldest first (a copy)."""
        return tuple(self._history)

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(s.steps for s in self._history)

    def reset(self) -> None:
        """Forget the whole history."""
        self._history = []
        self._invalidate()

    def _invalidate(self) -> None:  # subclasses drop their caches here
        pass

    # ------------------------------------------------------------------ state
    def _config(self) -> Dict[str, Any]:  # subclasses: their constructor arguments
        return {}

    def _load_config(self, config: Dict[str, Any]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable snapshot (plain floats, ints, lists) that ``load_state_dict`` restores."""
        return {
            "accountant": self.kind,
            "version": STATE_VERSION,
            "history": [[float(s.noise_multiplier), float(s.sample_rate), int(s.steps)] for s in self._history],
            "config": self._config(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace this accountant's history (and settings) with those of ``state``.

        The history of either accountant can be loaded into the other (the segments are the
        same); the settings are restored only between accountants of the same kind.
        """
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError("not an accountant state_dict: expected a dict with a 'history' key")
        version = state.get("version", STATE_VERSION)
        if version > STATE_VERSION:
            raise ValueError(f"state_dict version {version} is newer than this code understands ({STATE_VERSION})")
        history: List[Segment] = []
        for item in state["history"]:
            if len(item) != 3:
                raise ValueError(f"bad history entry {item!r}: expected (noise_multiplier, sample_rate, steps)")
            history.append(
                Segment(V.check_noise_multiplier(item[0]), V.check_sample_rate(item[1]), V.check_steps(item[2]))
            )
        if state.get("accountant") == self.kind:
            self._load_config(dict(state.get("config", {})))
        self._history = []
        for seg in history:  # re-merge through step() so the invariants hold
            self._history_append(seg)
        self._invalidate()

    def _history_append(self, seg: Segment) -> None:
        if seg.steps == 0:
            return
        if self._history and self._history[-1][:2] == seg[:2]:
            self._history[-1] = self._history[-1]._replace(steps=self._history[-1].steps + seg.steps)
        else:
            self._history.append(seg)

    def __repr__(self) -> str:
        segs = ", ".join(f"(sigma={s.noise_multiplier:g}, q={s.sample_rate:g}, steps={s.steps})" for s in self._history)
        return f"{type(self).__name__}([{segs}])"
