"""How t is drawn: uniform, and improved DDPM's loss-aware importance sampling (closed forms)."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.core.timesteps import (
    LossAwareTimesteps,
    UniformTimesteps,
    make_timestep_sampler,
)

T = 8


def _filled(losses_per_t, history=3, uniform_prob=1e-3) -> LossAwareTimesteps:
    s = LossAwareTimesteps(T, history=history, uniform_prob=uniform_prob)
    for _ in range(history):
        s.update(torch.arange(T), torch.as_tensor(losses_per_t, dtype=torch.float64))
    return s


def test_uniform_until_every_t_has_a_full_history():
    s = LossAwareTimesteps(T, history=2)
    ones = torch.ones(T)
    s.update(torch.arange(T), ones)                     # one loss each: not warm
    s.update(torch.arange(T - 1), ones[:-1])            # t = T-1 still has one
    assert not s.warm
    torch.testing.assert_close(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    t, w = s.sample(1000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(1000)) and t.min() >= 0 and t.max() < T
    s.update(torch.tensor([T - 1]), torch.tensor([5.0]))
    assert s.warm


def test_probabilities_are_the_root_mean_square_of_the_history():
    # history of t: [1, 2, 3] for every t, scaled by (t + 1): RMS_t = (t + 1)·√(14/3)
    s = LossAwareTimesteps(T, history=3, uniform_prob=0.01)
    for k in (1.0, 2.0, 3.0):
        s.update(torch.arange(T), k * (torch.arange(T) + 1.0))
    rms = (torch.arange(T, dtype=torch.float64) + 1) * (14 / 3) ** 0.5
    want = 0.99 * rms / rms.sum() + 0.01 / T
    torch.testing.assert_close(s.probabilities(), want)
    assert abs(float(s.probabilities().sum()) - 1) < 1e-12


def test_history_keeps_the_most_recent_losses_in_order():
    s = LossAwareTimesteps(T, history=3)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        s.update(torch.tensor([2, 2]), torch.tensor([v, 10 * v]))  # one t twice per batch
    # appended in batch order: 1, 10, 2, 20, …, 5, 50; the last three remain, oldest first
    assert s.recent(2) == [40.0, 5.0, 50.0]
    assert int(s.counts[2]) == 10
    s.update(torch.tensor([4, 2, 4, 4, 4, 4]), torch.tensor([1.0, 60.0, 2.0, 3.0, 4.0, 5.0]))
    assert s.recent(2) == [5.0, 50.0, 60.0] and s.recent(4) == [3.0, 4.0, 5.0]
    assert int(s.counts[4]) == 5
    s.update(torch.tensor([7]), torch.tensor([9.0]))  # a partial history keeps its order too
    assert s.recent(7) == [9.0]
    s.update(torch.tensor([3]), torch.tensor([float("nan")]))  # a non-finite loss is not kept
    assert int(s.counts[3]) == 0


def test_weighted_estimate_is_unbiased_and_has_the_closed_form_variance():
    L = torch.tensor([20.0, 5.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01], dtype=torch.float64)
    s = _filled(L, uniform_prob=1e-3)
    p = s.probabilities()
    n = 400_000
    t, w = s.sample(n, "cpu", torch.Generator().manual_seed(1))
    est = w.double() * L[t]
    mu = L.mean()
    # unbiased: E_p[L_t / (T p_t)] = (1/T) Σ_t L_t
    assert abs(float(est.mean() - mu)) < 4 * float(est.std()) / n ** 0.5
    # its variance is Σ_t L_t² / (T² p_t) − µ², far below uniform's (1/T) Σ L_t² − µ²
    var_is = float((L ** 2 / (T ** 2 * p)).sum() - mu ** 2)
    var_uniform = float((L ** 2).mean() - mu ** 2)
    assert abs(float(est.var()) / var_is - 1) < 0.05
    assert var_is < 0.1 * var_uniform
    # the weights are 1 / (T p_t) exactly
    torch.testing.assert_close(w.double(), 1 / (T * p[t]), rtol=1e-6, atol=0)


def test_zero_losses_fall_back_to_uniform():
    s = _filled(torch.zeros(T))
    torch.testing.assert_close(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))


def test_state_round_trip_and_shape_check():
    s = _filled(torch.arange(T, dtype=torch.float64) + 1)
    again = LossAwareTimesteps(T, history=3)
    again.load_state_dict(s.state_dict())
    torch.testing.assert_close(again.probabilities(), s.probabilities())
    with pytest.raises(ValueError, match=r"module\.timesteps\.history=4 does not fit"):
        LossAwareTimesteps(T, history=4).load_state_dict(s.state_dict())
    UniformTimesteps(T).load_state_dict(s.state_dict())  # uniform ignores a history


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "importance"}, r"module\.timesteps\.sampler='importance'.*uniform, loss_aware"),
    ({"sampler": "uniform", "history": 0}, r"module\.timesteps\.history=0"),
    ({"sampler": "loss_aware", "history": 2.5}, r"module\.timesteps\.history=2\.5"),
    ({"sampler": "loss_aware", "uniform_prob": 0.0}, r"module\.timesteps\.uniform_prob=0\.0"),
    ({"sampler": "uniform", "uniform_prob": 1.5}, r"module\.timesteps\.uniform_prob=1\.5"),
])
def test_bad_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_timestep_sampler(T, **kwargs)


def test_vectorized_history_matches_a_plain_list_per_t():
    s, plain = LossAwareTimesteps(50, history=4), {}
    g = torch.Generator().manual_seed(3)
    for _ in range(200):  # batches with many repeats of the same t
        t = torch.randint(0, 50, (37,), generator=g)
        losses = torch.rand(37, generator=g, dtype=torch.float64)
        s.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            plain.setdefault(ti, []).append(li)
    for ti in range(50):
        assert s.recent(ti) == plain.get(ti, [])[-4:], ti
        assert int(s.counts[ti]) == len(plain.get(ti, []))


def test_edge_cases_fail_or_work_as_documented():
    s = _filled(torch.arange(T, dtype=torch.float64) + 1)
    t, w = s.sample(0, "cpu")
    assert t.shape == w.shape == (0,)
    g = torch.Generator().manual_seed(5)
    a = s.sample(64, "cpu", generator=g)[0]
    assert torch.equal(a, s.sample(64, "cpu", generator=torch.Generator().manual_seed(5))[0])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 8\)"):
        s.update(torch.tensor([-1]), torch.tensor([1.0]))
    bad = s.state_dict()
    bad["counts"] = torch.zeros(T + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit"):
        LossAwareTimesteps(T, history=3).load_state_dict(bad)
