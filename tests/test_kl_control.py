"""KL coefficient controllers (Ziegler et al. 2019, arXiv 1909.08593, Sec. 2.2;
Huang et al. 2023, "The N Implementation Details of RLHF with PPO", detail 20)."""

import json
import math

import pytest

from rufus.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller

# init 0.1, target 6, horizon 10000 and batches of n = 256 episodes: n / horizon = 0.0256


def test_kl_at_target_leaves_coef_unchanged():
    # e = clip(6/6 - 1) = 0 -> beta * (1 + 0) = beta
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for _ in range(5):
        ctl.update(6.0, 256)
    assert ctl.value == 0.1


def test_kl_far_above_target_saturates_at_plus_20_percent():
    # KL >= 1.2 target: e = clip(KL/6 - 1, -0.2, 0.2) = 0.2 -> beta * (1 + 0.2 * 0.0256) = 0.1 * 1.00512
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # e = 1, clipped to 0.2
    assert ctl.value == 0.1 * (1 + 0.2 * 256 / 10000)
    assert ctl.value == pytest.approx(0.100512, abs=1e-15)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(1.2 * 6.0, 256)  # e = 7.2/6 - 1 = 0.2 up to float rounding (0.19999999999999996)
    assert ctl.value == pytest.approx(0.100512, rel=1e-14)
    ctl.update(1e6, 256)  # twice compounds: 0.1 * 1.00512^2 = 0.1010266
    assert ctl.value == pytest.approx(0.1 * 1.00512**2, rel=1e-14)


def test_kl_zero_shrinks_by_20_percent_of_the_step():
    # e = clip(0/6 - 1) = clip(-1) = -0.2 -> 0.1 * (1 - 0.2 * 0.0256) = 0.1 * 0.99488 = 0.099488
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(0.0, 256)
    assert ctl.value == pytest.approx(0.099488, rel=1e-14)


def test_kl_inside_the_band_by_hand():
    # KL 6.6: e = 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 0.0256) = 0.100256
    # KL 5.4: e = -0.1             -> 0.1 * (1 - 0.1 * 0.0256) = 0.099744
    # KL 7.0 with n = 64, horizon 1000: e = 1/6 -> 0.15 * (1 + (1/6) * 0.064) = 0.15 * 1.0106667 = 0.1516
    up, down = AdaptiveKLController(0.1, 6.0, 10000), AdaptiveKLController(0.1, 6.0, 10000)
    up.update(6.6, 256)
    down.update(5.4, 256)
    assert up.value == pytest.approx(0.100256, rel=1e-12)
    assert down.value == pytest.approx(0.099744, rel=1e-12)
    other = AdaptiveKLController(0.15, 6.0, 1000)
    other.update(7.0, 64)
    assert other.value == pytest.approx(0.1516, rel=1e-12)


def test_fixed_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1e9, -3.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


def test_state_dict_round_trip_through_json():
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    for kl in (9.0, 2.0, 7.5):
        ctl.update(kl, 512)
    state = json.loads(json.dumps(ctl.state_dict()))
    resumed = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value
    ctl.update(8.0, 512)
    resumed.update(8.0, 512)
    assert resumed.value == ctl.value  # the resumed run continues identically

    fixed = FixedKLController(0.3)
    other = FixedKLController(0.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.3


def test_factory_and_validation():
    assert isinstance(make_kl_controller(0.05, None, 10000), FixedKLController)
    ctl = make_kl_controller(0.05, 6.0, 10000)
    assert isinstance(ctl, AdaptiveKLController)
    assert (ctl.value, ctl.target, ctl.horizon) == (0.05, 6.0, 10000)
    with pytest.raises(ValueError, match="target must be positive"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="horizon must be positive"):
        AdaptiveKLController(0.1, 6.0, 0)
    with pytest.raises(ValueError, match="non-finite KL"):
        AdaptiveKLController(0.1, 6.0, 10).update(math.nan, 1)
