import pytest
import torch

from npedit import flow
from npedit.sampler import sample, unroll_times


def test_schedule_matches_method():
    assert [round(t, 4) for t in flow.few_step_times(4, 6.0)] == [1.0, 0.9474, 0.8571, 0.6667]
    assert flow.few_step_times(4, 1.0) == [1.0, 0.75, 0.5, 0.25]


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.add_noise(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, t, v), eps)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, t, x0), v)
    torch.testing.assert_close(flow.add_noise(x0, eps, 0.0), x0)
    torch.testing.assert_close(flow.add_noise(x0, eps, 1.0), eps)


def test_guidance_per_sample_scale():
    c, u = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = flow.guided(c, u, torch.tensor([1.0, 3.0]))
    assert out[0].eq(1).all() and out[1].eq(3).all()


def test_sampler_exact_for_constant_velocity():
    # A constant velocity field c transports x_1 = eps to x_0 = eps - c; the ODE re-noising is exact.
    eps, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = sample(lambda x, t: c, eps, flow.few_step_times(4), renoise="ode")
    torch.testing.assert_close(out, eps - c)


def test_sampler_recovers_point_mass_with_fresh_noise():
    # The exact velocity toward a single data point x* is (x_t - x*) / t: every step predicts x*.
    target = torch.randn(2, 3, 4, 4)
    seen = []
    out = sample(lambda x, t: flow.velocity_from_x0(x, t, target), torch.randn(2, 3, 4, 4),
                 flow.few_step_times(4), generator=torch.Generator().manual_seed(0), callback=seen.append)
    torch.testing.assert_close(out, target)
    assert [s.step for s in seen] == [0, 1, 2, 3] and seen[1].t == flow.few_step_times(4)[1]
    torch.testing.assert_close(seen[2].x0, target)


def test_fresh_renoising_draws_new_noise_from_the_generator_each_step():
    """method.md section 2: each step re-noises its x0 to the next t with fresh Gaussian noise, drawn in order from
    the caller's generator (not the noise implied by the velocity, which is the "ode" choice)."""
    noise, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    times = flow.few_step_times(4)
    out = sample(lambda x, t: c, noise, times, generator=torch.Generator().manual_seed(0))
    replay, x0 = torch.Generator().manual_seed(0), noise - c  # the first step, at t = 1
    for t in times[1:]:
        x0 = flow.add_noise(x0, torch.randn(noise.shape, generator=replay), t) - t * c
    torch.testing.assert_close(out, x0)
    assert not torch.allclose(out, noise - c)  # what "ode" gives for a constant velocity


def test_sampler_times_stay_float32_for_bf16_latents():
    """A bf16 pipeline's latents (the CLI's and the app's default on a GPU) must not round the time the denoiser
    sees: in bf16 t = 0.9474 of the 4-step schedule is 0.9492, 1000 (1 - t) off by ~2 (50.78 for 52.63)."""
    seen = []
    sample(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16),
           flow.few_step_times(4), generator=torch.Generator().manual_seed(0))
    assert [s.dtype for s in seen] == [torch.float32] * 4
    assert [float(s[0]) for s in seen] == [float(torch.tensor(t)) for t in flow.few_step_times(4)]


def test_sampler_keeps_gradients_through_steps():
    """The training unroll backpropagates through every step: the autograd gradient of the last x0 equals a finite
    difference under the same noise (a gradient cut between steps would keep only the last step's share)."""
    noise = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(w):
        return sample(lambda x, t: w * x, noise, flow.few_step_times(4),
                      generator=torch.Generator().manual_seed(0)).sum()

    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    run(w).backward()
    h = 1e-6
    with torch.no_grad():
        slope = (run(torch.tensor(0.5 + h, dtype=torch.float64)) - run(torch.tensor(0.5 - h, dtype=torch.float64)))
    slope /= 2 * h
    assert abs(float(slope)) > 0.1
    assert float(w.grad) == pytest.approx(float(slope), rel=1e-6)


def test_unroll_times_mix():
    sched = flow.few_step_times(4)
    g = torch.Generator().manual_seed(0)
    draws = [tuple(unroll_times(sched, 0.75, g)) for _ in range(400)]
    two = [d for d in draws if len(d) == 2]
    assert 0.65 < len(two) / len(draws) < 0.85
    assert {d[1] for d in two} == set(sched[1:]) and all(d[0] == 1.0 for d in draws)
    assert unroll_times(sched, 0.0, g) == [1.0]
