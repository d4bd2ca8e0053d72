import math

import numpy as np
import pytest

from ddpm_lightning.core.schedules import SCHEDULES, make_beta_schedule, validate_betas


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 10, 1000])
def test_every_schedule_is_float64_in_unit_interval(name, T):
    b = make_beta_schedule(name, T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert np.all((b > 0) & (b < 1))


def test_linear_is_the_papers():
    b = make_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4, abs=0) and b[-1] == pytest.approx(0.02, abs=1e-18)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)


def test_cosine_matches_closed_form_and_clip():
    T, s = 1000, 0.008
    b = make_beta_schedule("cosine", T)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    abar = np.cumprod(1 - b)
    for t in (1, 250, 500, 900):  # ᾱ_t = f(t)/f(0), paper t = 1..T
        assert abar[t - 1] == pytest.approx(f(t) / f(0), rel=1e-9)
    assert b.max() <= 0.999 and b[-1] == 0.999  # the last step is clipped


def test_quadratic_sigmoid_constant_shapes():
    q = make_beta_schedule("quadratic", 100, 1e-4, 0.02)
    assert np.sqrt(q[0]) == pytest.approx(1e-2) and np.sqrt(q[-1]) == pytest.approx(0.02**0.5)
    s = make_beta_schedule("sigmoid", 100)
    assert np.all(np.diff(s) > 0) and 1e-4 < s[0] < s[-1] < 0.02
    c = make_beta_schedule("constant", 7, beta_end=0.05)
    assert np.all(c == 0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="linear", T=0), r"schedule\.T=0"),
        (dict(name="linear", T=-5), r"schedule\.T=-5"),
        (dict(name="linear", T=2.5), r"schedule\.T=2\.5"),
        (dict(name="bogus"), r"schedule\.name='bogus'.*linear, cosine"),
        (dict(name="linear", beta_end=1.5), r"schedule\.beta_end=1\.5"),
        (dict(name="linear", beta_start=0.0), r"schedule\.beta_start=0\.0"),
        (dict(name="linear", beta_start=float("nan")), r"schedule\.beta_start=nan"),
        (dict(name="cosine", max_beta=1.0), r"schedule\.max_beta=1\.0"),
    ],
)
def test_invalid_schedules_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_beta_schedule(**kwargs)


@pytest.mark.parametrize(
    "betas, match",
    [([0.1, 0.0], r"\[1\]=0 is outside \(0, 1\)"), ([0.1, float("inf")], r"\[1\]=inf is not finite"),
     ([1.0], r"\[0\]=1 is outside"), ([], "non-empty")],
)
def test_validate_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        validate_betas(betas)
