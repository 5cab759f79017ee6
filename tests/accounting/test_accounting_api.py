"""Public API: input checks, heterogeneous histories, state, calibration, command line, import."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from dpkernels.accounting import PLDAccountant, RDPAccountant, calibrate_noise_multiplier, steps_for_epochs

IN_CI = os.environ.get("CI", "").lower() == "true"

ACCOUNTANTS = [PLDAccountant, RDPAccountant]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", ACCOUNTANTS)
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1), "noise_multiplier"),
        (dict(noise_multiplier=-1.0, sample_rate=0.1, steps=1), "noise_multiplier"),
        (dict(noise_multiplier=float("nan"), sample_rate=0.1, steps=1), "noise_multiplier"),
        (dict(noise_multiplier=float("inf"), sample_rate=0.1, steps=1), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=0.0, steps=1), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=-0.1, steps=1), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1), "steps"),
    ],
)
def test_bad_step_is_refused(cls, kwargs, match):
    acc = cls()
    with pytest.raises(ValueError, match=match):
        acc.step(**kwargs)
    assert acc.history == ()


@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_bad_queries_are_refused(cls):
    acc = cls().step(1.0, 0.01, 10)
    for bad in (0.0, 1.0, -1e-5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            acc.epsilon(bad)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            acc.delta(bad)
    with pytest.raises(TypeError, match="steps"):
        acc.step(1.0, 0.01, 2.5)
    with pytest.raises(TypeError):
        acc.step("1.0", 0.01, 1)


def test_bad_calibration_is_refused():
    with pytest.raises(ValueError, match="cannot be reached"):  # q=1, 10^4 steps, eps 0.01
        calibrate_noise_multiplier(0.01, 1e-5, 1.0, 10_000, accountant="rdp")
    with pytest.raises(ValueError, match="met by every noise multiplier"):
        calibrate_noise_multiplier(500.0, 1e-5, 1e-3, 1, accountant="rdp")
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise_multiplier(1.0, 1.0, 0.01, 100)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.0, 100)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100, epochs=1)
    with pytest.raises(ValueError, match="accountant"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100, accountant="moments")


# ---------------------------------------------------------------------------- histories
@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_steps_merge_and_order_does_not_matter(cls):
    one = cls().step(1.0, 0.02, 50)
    many = cls()
    for _ in range(50):
        many.step(1.0, 0.02)
    assert many.history == one.history and many.steps == 50
    assert many.epsilon(1e-5) == pytest.approx(one.epsilon(1e-5), rel=1e-12)

    ab = cls().step(1.0, 0.02, 300).step(2.0, 0.1, 100)
    ba = cls().step(2.0, 0.1, 100).step(1.0, 0.02, 300)
    assert ab.epsilon(1e-5) == pytest.approx(ba.epsilon(1e-5), rel=1e-5)
    # splitting a segment in two changes nothing either
    split = cls().step(1.0, 0.02, 100).step(2.0, 0.1, 100).step(1.0, 0.02, 200)
    assert split.epsilon(1e-5) == pytest.approx(ab.epsilon(1e-5), rel=1e-5)
    # more steps never mean less privacy loss
    assert cls().step(1.0, 0.02, 301).step(2.0, 0.1, 100).epsilon(1e-5) >= ab.epsilon(1e-5)


def test_heterogeneous_schedule_matches_dp_accounting():
    dp = pytest.importorskip("dp_accounting", reason="the oracle: pip install dp-accounting")
    from dp_accounting.pld import pld_privacy_accountant

    # a schedule that grows the batch (sample rate) and lowers the noise during training
    schedule = [(1.5, 0.002, 2000), (1.1, 0.005, 1500), (0.9, 0.01, 500)]
    pld, rdp = PLDAccountant(), RDPAccountant()
    events = []
    for sigma, q, n in schedule:
        pld.step(sigma, q, n)
        rdp.step(sigma, q, n)
        events.append(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)), n))
    ref_pld = pld_privacy_accountant.PLDAccountant()
    ref_rdp = dp.rdp.RdpAccountant()
    ref_pld.compose(dp.ComposedDpEvent(events))
    ref_rdp.compose(dp.ComposedDpEvent(events))
    for delta in (1e-5, 1e-6):
        assert pld.epsilon(delta) == pytest.approx(ref_pld.get_epsilon(delta), rel=0.01)
        assert rdp.epsilon(delta) == pytest.approx(ref_rdp.get_epsilon(delta), rel=0.01)
    eps = pld.epsilon(1e-5)
    assert pld.delta(eps) == pytest.approx(1e-5, rel=1e-3)
    assert ref_pld.get_delta(eps) == pytest.approx(1e-5, rel=0.05)


# ---------------------------------------------------------------------------- state
@pytest.mark.parametrize("cls", ACCOUNTANTS)
def test_state_survives_a_restart(cls, tmp_path):
    acc = cls().step(1.1, 0.004, 1000).step(0.9, 0.008, 250)
    path = tmp_path / "accountant.json"
    path.write_text(json.dumps(acc.state_dict()))
    restored = cls()
    restored.load_state_dict(json.loads(path.read_text()))
    assert restored.history == acc.history
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    # training goes on after the restart
    restored.step(0.9, 0.008, 250)
    assert restored.history[-1].steps == 500
    # the other accountant can read the same history
    other = (RDPAccountant if cls is PLDAccountant else PLDAccountant)()
    other.load_state_dict(acc.state_dict())
    assert other.history == acc.history


def test_state_keeps_settings_and_refuses_garbage():
    acc = RDPAccountant(orders=[2, 4, 8]).step(1.0, 0.01, 10)
    again = RDPAccountant()
    again.load_state_dict(acc.state_dict())
    assert list(again.orders) == [2, 4, 8]
    pld = PLDAccountant(value_discretization_interval=1e-4).step(1.0, 0.01, 10)
    p2 = PLDAccountant()
    p2.load_state_dict(pld.state_dict())
    assert p2.value_discretization_interval == 1e-4
    with pytest.raises(ValueError, match="history"):
        p2.load_state_dict({"steps": 3})
    with pytest.raises(ValueError, match="sample_rate"):
        p2.load_state_dict({"history": [[1.0, 2.0, 3]]})
    with pytest.raises(ValueError, match="newer"):
        p2.load_state_dict({"history": [], "version": 99})


# ---------------------------------------------------------------------------- calibration
@pytest.mark.parametrize(
    "accountant,target,delta,q,steps",
    [
        ("pld", 3.0, 1e-5, 0.01, 1000),
        ("pld", 1.0, 1e-6, 0.004, 10_000),
        ("rdp", 3.0, 1e-5, 0.01, 1000),
        ("pld", 8.0, 1e-5, 1.0, 100),
    ],
)
def test_calibration_is_the_smallest_sigma_to_3_digits(accountant, target, delta, q, steps):
    cls = PLDAccountant if accountant == "pld" else RDPAccountant
    t0 = time.perf_counter()
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=accountant
    )
    elapsed = time.perf_counter() - t0
    assert isinstance(sigma, float)
    assert cls().step(sigma, q, steps).epsilon(delta) <= target  # meets the target
    assert cls().step(sigma * (1 - 5e-4), q, steps).epsilon(delta) > target  # and is minimal to 3 digits
    if not IN_CI:  # speed is measured (docs/accounting.md), not asserted, on a shared CI runner
        assert elapsed < 10.0, f"calibration took {elapsed:.1f} s"


def test_calibration_matches_dp_accounting():
    # dp_accounting's own calibration takes ~20 s here, so check the equivalent: its PLD
    # epsilon crosses the target within +-0.2% of our sigma.
    dp = pytest.importorskip("dp_accounting", reason="the oracle: pip install dp-accounting")
    from dp_accounting.pld import pld_privacy_accountant

    q, steps, target, delta = 0.01, 1000, 3.0, 1e-5
    sigma = calibrate_noise_multiplier(target, delta, q, steps)

    def dp_eps(s):
        acc = pld_privacy_accountant.PLDAccountant()
        acc.compose(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(s)), steps))
        return acc.get_epsilon(delta)

    assert dp_eps(sigma * (1 + 2e-3)) <= target < dp_eps(sigma * (1 - 2e-3))


def test_epochs():
    assert steps_for_epochs(1, 0.01) == 100
    assert steps_for_epochs(2.5, 0.004) == 625
    s1 = calibrate_noise_multiplier(3.0, 1e-5, 0.01, epochs=10, accountant="rdp")
    s2 = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 1000, accountant="rdp")
    assert s1 == s2


# ---------------------------------------------------------------------------- speed
@pytest.mark.skipif(IN_CI, reason="speed is measured (docs/accounting.md), not asserted, on a shared CI runner")
@pytest.mark.parametrize("cls", ACCOUNTANTS)
@pytest.mark.parametrize("sigma,q", [(1.1, 0.004), (0.5, 0.1), (4.0, 1e-3), (1.0, 1.0)])
def test_epsilon_for_10000_steps_under_a_second(cls, sigma, q):
    best = math.inf
    for _ in range(2):  # best of two: the machine may be busy
        t0 = time.perf_counter()
        cls().step(sigma, q, 10_000).epsilon(1e-5)
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0, f"{cls.__name__} took {best:.2f} s"


# ---------------------------------------------------------------------------- entry points
def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_import_does_not_need_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
        "import dpkernels.accounting as A\n"
        "print(A.PLDAccountant().step(1.0, 0.01, 100).epsilon(1e-5))\n"
        "assert sys.modules['torch'] is None\n"
    )
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) > 0


def test_command_line():
    r = _run(
        "-m",
        "dpkernels.accounting",
        "--noise-multiplier",
        "1.1",
        "--sample-rate",
        "0.004",
        "--steps",
        "10000",
        "--delta",
        "1e-5",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["pld_epsilon"] == pytest.approx(PLDAccountant().step(1.1, 0.004, 10_000).epsilon(1e-5))
    assert out["rdp_epsilon"] == pytest.approx(RDPAccountant().step(1.1, 0.004, 10_000).epsilon(1e-5))
    text = _run("-m", "dpkernels.accounting", "-s", "1.1", "-q", "0.004", "-n", "10000", "-d", "1e-5")
    assert "PLD epsilon:" in text.stdout and "RDP epsilon:" in text.stdout
    cal = _run(
        "-m",
        "dpkernels.accounting",
        "--target-epsilon",
        "3",
        "--sample-rate",
        "0.004",
        "--steps",
        "10000",
        "--delta",
        "1e-5",
        "--accountant",
        "rdp",
    )
    assert cal.returncode == 0, cal.stderr
    assert "RDP noise multiplier:" in cal.stdout
    bad = _run("-m", "dpkernels.accounting", "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "10")
    assert bad.returncode == 2 and "noise_multiplier" in bad.stderr
