"""Privacy accounting for DP-SGD (the Poisson-subsampled Gaussian mechanism composed over steps).

Plain numpy/scipy: importing this package needs neither torch nor a GPU.

    from dpkernels.accounting import PLDAccountant, RDPAccountant, calibrate_noise_multiplier

    acc = PLDAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004, steps=1000)
    acc.epsilon(delta=1e-5)     # pessimistic (upper-bound) epsilon: the number to report
    acc.delta(epsilon=3.0)

    calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000)

Adjacency is add/remove-one (the standard one for Poisson sampling) throughout.
``PLDAccountant`` is tight (privacy loss distribution, connect-the-dots discretisation, FFT
composition); ``RDPAccountant`` is the classic Renyi-DP bound. Both accept a history of
heterogeneous segments (call ``step`` with new settings) and save/restore it with
``state_dict()`` / ``load_state_dict()``. Command line: ``python -m dpkernels.accounting -h``.
"""

from .calibration import calibrate_noise_multiplier, steps_for_epochs
from .pld import PLDAccountant
from .rdp import DEFAULT_ORDERS, RDPAccountant, compute_rdp, rdp_to_delta, rdp_to_epsilon

__all__ = [
    "PLDAccountant",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "steps_for_epochs",
    "compute_rdp",
    "rdp_to_epsilon",
    "rdp_to_delta",
    "DEFAULT_ORDERS",
]
