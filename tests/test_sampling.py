"""Samplers and guidance against closed forms (CPU, fast, no training).

Data models with exact noise predictors (derived here, independently of framework/):
* Gaussian x_0 ~ N(m, s2 I): x_t ~ N(sqrt(a) m, v), v = a s2 + 1 - a (a = abar_t),
  E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / v,  E[x_0 | x_t] = m + sqrt(a) s2 (x_t - sqrt(a) m) / v.
* Two labelled components y in {0, 1}, means +-mu, variance s2, equal weights: the conditional eps is
  the Gaussian one per component; the unconditional eps is the posterior-weighted mixture of them,
  with p(y | x_t) = softmax_y(-||x_t - sqrt(a) mu_y||^2 / (2 v)).
"""
import math

import numpy as np
import pytest
import torch

from framework.diffusion.process import Schedule, eps_from_pred, v_from_eps, x0_from_eps
from framework.diffusion.sampling import (cfg_model, classifier_grad_fn, classifier_guided_model, ddim_sample,
                                ddpm_sample, langevin_sample, timesteps)




# ---------------------------------------------------------------------------------------------
# Exact models
# ---------------------------------------------------------------------------------------------
def gaussian_eps(sched, m, s2):
    def fn(x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        a = sched.gather(sched.abar, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s2 + 1 - a)
    return fn


class Mixture:
    """Two labelled 2-D Gaussians N(+-mu, s2 I); label 2 is the null (unconditional) condition."""
    NULL = 2

    def __init__(self, sched, mu=(1.5, 0.0), s2=0.25):
        self.sched, self.s2 = sched, s2
        self.mus = torch.tensor([mu, [-v for v in mu]], dtype=torch.float64)      # (2, D)

    def _parts(self, x, t):
        a = self.sched.gather(self.sched.abar, t, x).unsqueeze(1)                 # (B, 1, 1)
        v = a * self.s2 + 1 - a
        d = x.unsqueeze(1) - a.sqrt() * self.mus.to(x)                            # (B, 2, D)
        return (1 - a).sqrt() * d / v, (-0.5 * d ** 2 / v).sum(-1)               # eps_y, logits

    def model(self, x, t, y):
        """eps(x_t, y, t) for y in {0, 1}; the unconditional eps(x_t, t) for y == NULL."""
        if isinstance(y, dict):
            y = y["y"]
        eps_c, logits = self._parts(x, t)
        post = logits.softmax(1).unsqueeze(-1)                                    # p(y | x_t)
        uncond = (post * eps_c).sum(1)
        cond = eps_c[torch.arange(x.shape[0], device=x.device), y.clamp(max=1)]
        return torch.where((y == self.NULL).unsqueeze(-1), uncond, cond)

    def uncond(self, x, t):
        return self.model(x, t, torch.full((x.shape[0],), self.NULL))

    def log_post(self, x, t, y):
        """log p(y | x_t), exact, (B,)."""
        return self._parts(x, t)[1].log_softmax(1)[torch.arange(x.shape[0], device=x.device), y]

    def clean_log_post(self, x, y):
        d = x.unsqueeze(1) - self.mus.to(x)
        return (-0.5 * d ** 2 / self.s2).sum(-1).log_softmax(1)[torch.arange(x.shape[0], device=x.device), y]


def standard_normal(n, d, seed, dtype=torch.float64):
    """x_T ~ N(0, I), standardised per dim (removes the sampling noise of x_T from the moments)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return (x - x.mean(0)) / x.std(0)


# ---------------------------------------------------------------------------------------------
# Samplers reproduce Gaussian data
# ---------------------------------------------------------------------------------------------
SAMPLERS = {
    # name: (call, allowance for the time discretisation bias of the variance, relative)
    "ddpm": (lambda fn, x, s, g: ddpm_sample(fn, x, s, generator=g), 0.02),
    "ddim_eta0": (lambda fn, x, s, g: ddim_sample(fn, x, s, steps=500, eta=0.0), 0.02),
    "ddim_eta1": (lambda fn, x, s, g: ddim_sample(fn, x, s, steps=500, eta=1.0, generator=g), 0.05),
    "langevin": (lambda fn, x, s, g: langevin_sample(fn, x, s, n_steps_each=2, snr=0.1, generator=g), 0.04),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_gaussian_data(name):
    """The optimal eps model for N(m, s2 I) plugged into each sampler gives mean m and variance s2
    within 4.5 standard errors (+ a small allowance for the discretisation bias)."""
    call, allowance = SAMPLERS[name]
    sched = Schedule(1000)                                          # the default DDPM schedule
    m, s2, n, d = 0.5, 0.25, 10000, 2
    x = call(gaussian_eps(sched, m, s2), standard_normal(n, d, 0), sched, torch.Generator().manual_seed(1))
    assert x.shape == (n, d) and x.dtype == torch.float64 and torch.isfinite(x).all()
    N = n * d
    assert abs(x.mean().item() - m) < 4.5 * math.sqrt(s2 / N) + 0.01 * math.sqrt(s2)
    assert abs(x.var().item() / s2 - 1) < 4.5 * math.sqrt(2 / N) + allowance


def _gauss_parts(a, m, s2):
    """For Gaussian data at abar = a: x -> E[eps|x] = k (x - sqrt(a) m), E[x0|x] = m + r (x - sqrt(a) m)."""
    v = a * s2 + 1 - a
    return math.sqrt(1 - a) / v, math.sqrt(a) * s2 / v


def test_ddpm_step_moments_exact_small_T():
    """With T = 8 big steps, the sample moments match the exact moments of the lecture's kernel
    p(x_{t-1} | x_t) = N(mu_theta, beta_tilde_t) propagated by hand, with mu_theta = E[mu_tilde | x_t]
    = c0 E[x0 | x_t] + c1 x_t (Bayes) -- a wrong variance (e.g. beta_t) or mean coefficient fails."""
    T, m, s2 = 8, 0.7, 0.3
    sched = Schedule(T, "linear", 0.05, 0.6)
    betas = sched.betas[1:].numpy()
    a = np.concatenate([[1.0], np.cumprod(1 - betas)])
    M, V = 0.0, 1.0
    for t in range(T, 0, -1):
        beta, alpha, ab, ap = betas[t - 1], 1 - betas[t - 1], a[t], a[t - 1]
        k, r = _gauss_parts(ab, m, s2)
        if t > 1:
            var_tilde = 1 / (alpha / beta + 1 / (1 - ap))
            c0, c1 = var_tilde * math.sqrt(ap) / (1 - ap), var_tilde * math.sqrt(alpha) / beta
        else:                                           # q(x_0 | x_1, x_0) is a point mass at x_0
            var_tilde, c0, c1 = 0.0, 1.0, 0.0
        A, c = c0 * r + c1, c0 * (m - r * math.sqrt(ab) * m)     # mu_theta = A x_t + c
        M, V = A * M + c, A * A * V + var_tilde
    n = 40000
    x = ddpm_sample(gaussian_eps(sched, m, s2), standard_normal(n, 1, 2), sched,
                    generator=torch.Generator().manual_seed(3))
    assert abs(x.mean().item() - M) < 4.5 * math.sqrt(V / n)
    assert abs(x.var().item() / V - 1) < 4.5 * math.sqrt(2 / n)
    # with 8 steps the kernel is far from exact: the test sees the difference to the data variance
    assert abs(V - s2) > 10 * math.sqrt(2 / n) * V


def test_ddim_eta0_is_the_exact_affine_map():
    """Deterministic DDIM on the optimal Gaussian model is an affine map x_T -> x_0; compose it by hand
    from the DDIM update x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat and compare per sample."""
    T, m, s2, steps = 100, -0.3, 0.2, 7
    sched = Schedule(T, "cosine")
    ts = timesteps(T, steps)
    assert ts[0] == T and ts[-1] == 0 and len(ts) == steps + 1 and all(x > y for x, y in zip(ts, ts[1:]))
    a = sched.abar.numpy()
    A, c = 1.0, 0.0                                     # x = A x_T + c
    for t, s in zip(ts, ts[1:]):
        k, r = _gauss_parts(a[t], m, s2)
        # x_s = sqrt(a_s) (m + r (x - sqrt(a_t) m)) + sqrt(1 - a_s) k (x - sqrt(a_t) m)
        slope = math.sqrt(a[s]) * r + math.sqrt(1 - a[s]) * k
        A, c = slope * A, slope * c + math.sqrt(a[s]) * m - slope * math.sqrt(a[t]) * m
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = ddim_sample(gaussian_eps(sched, m, s2), x_T, sched, steps=steps, eta=0.0)
    torch.testing.assert_close(x, A * x_T + c, rtol=1e-10, atol=1e-10)


def test_ddim_stochastic_moments_exact():
    """DDIM with eta = 0.5 on a strided subset: moments of the hand-propagated DDIM kernel
    (sigma = eta sqrt((1-a_s)/(1-a_t)) sqrt(1 - a_t/a_s))."""
    T, m, s2, steps, eta = 12, 0.4, 0.5, 4, 0.5
    sched = Schedule(T, "linear", 0.02, 0.5)
    a = sched.abar.numpy()
    M, V = 0.0, 1.0
    for t, s in zip(timesteps(T, steps), timesteps(T, steps)[1:]):
        k, r = _gauss_parts(a[t], m, s2)
        sig2 = eta ** 2 * (1 - a[s]) / (1 - a[t]) * (1 - a[t] / a[s])
        slope = math.sqrt(a[s]) * r + math.sqrt(1 - a[s] - sig2) * k
        M, V = slope * M + math.sqrt(a[s]) * m - slope * math.sqrt(a[t]) * m, slope ** 2 * V + sig2
    n = 40000
    x = ddim_sample(gaussian_eps(sched, m, s2), standard_normal(n, 1, 4), sched, steps=steps, eta=eta,
                    generator=torch.Generator().manual_seed(5))
    assert abs(x.mean().item() - M) < 4.5 * math.sqrt(V / n)
    assert abs(x.var().item() / V - 1) < 4.5 * math.sqrt(2 / n)


def test_ddim_eta1_all_steps_is_ddpm():
    """eta = 1, steps = T: sigma^2 = beta_tilde_t and the same noise draws -> the DDPM samples."""
    sched = Schedule(50, "cosine")
    fn = gaussian_eps(sched, 0.2, 0.4)
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = ddpm_sample(fn, x_T, sched, generator=torch.Generator().manual_seed(7))
    b = ddim_sample(fn, x_T, sched, steps=50, eta=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_timesteps_subset():
    assert timesteps(10, 10) == list(range(10, -1, -1))
    assert timesteps(1000, 4) == [1000, 750, 500, 250, 0]
    assert timesteps(10, 3) == [10, 6, 3, 0]
    for bad in (0, 11, 2.0):
        with pytest.raises(ValueError):
            timesteps(10, bad)


# ---------------------------------------------------------------------------------------------
# Determinism, dtypes, shapes, callbacks, other parameterisations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_determinism_shapes_dtypes(dtype):
    sched = Schedule(40, "cosine")
    fn = gaussian_eps(sched, 0.1, 0.5)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    calls = [
        lambda g: ddpm_sample(fn, x_T, sched, generator=g),
        lambda g: ddim_sample(fn, x_T, sched, steps=10, eta=0.7, generator=g),
        lambda g: langevin_sample(fn, x_T, sched, n_steps_each=1, steps=10, generator=g),
    ]
    for call in calls:
        a, b = call(torch.Generator().manual_seed(11)), call(torch.Generator().manual_seed(11))
        c = call(torch.Generator().manual_seed(12))
        assert a.shape == x_T.shape and a.dtype == dtype
        assert torch.equal(a, b) and not torch.equal(a, c)
    d1, d2 = ddim_sample(fn, x_T, sched, steps=10), ddim_sample(fn, x_T, sched, steps=10)
    assert torch.equal(d1, d2)                                      # eta = 0 needs no generator


def test_callback_progress_and_v_prediction():
    sched = Schedule(30, "cosine")
    fn = gaussian_eps(sched, 0.1, 0.5)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    ddim_sample(fn, x_T, sched, steps=5, callback=lambda d: seen.append(d["t"]), progress=True)
    assert seen == [30, 24, 18, 12, 6]
    seen.clear()
    ddpm_sample(fn, x_T, sched, generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(d["t"]))
    assert seen == list(range(30, 0, -1))

    def v_model(x, t):                                             # the same model, predicting v
        eps = fn(x, t)
        return v_from_eps(eps, x0_from_eps(eps, x, t, sched), t, sched)

    for sampler in (lambda f, **kw: ddim_sample(f, x_T, sched, steps=6, **kw),
                    lambda f, **kw: ddpm_sample(f, x_T, sched, generator=torch.Generator().manual_seed(1), **kw)):
        torch.testing.assert_close(sampler(v_model, prediction="v"), sampler(fn), rtol=1e-8, atol=1e-8)
    t = torch.full((8,), 5)
    torch.testing.assert_close(eps_from_pred(v_model(x_T, t), x_T, t, sched, "v"), fn(x_T, t))


def test_sampler_bad_inputs():
    sched = Schedule(10)
    fn = gaussian_eps(sched, 0.0, 1.0)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(fn, x, sched, steps=11)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(fn, x, sched, steps=0)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(fn, x, sched, eta=-0.1, steps=5)
    with pytest.raises(ValueError, match="classifier_scale"):
        ddpm_sample(fn, x, sched, classifier_grad=lambda x, t: x, classifier_scale=-1.0)
    with pytest.raises(ValueError, match="snr"):
        langevin_sample(fn, x, sched, snr=-0.1)
    with pytest.raises(ValueError, match="shaped like x"):
        ddpm_sample(lambda x, t: x[:, :1], x, sched)
    with pytest.raises(ValueError, match="prediction"):
        ddim_sample(fn, x, sched, steps=5, prediction="score")
    with pytest.raises(ValueError, match="x_T"):
        ddim_sample(fn, torch.zeros(4, 2, dtype=torch.long), sched, steps=5)
    with pytest.raises(TypeError, match="Schedule"):
        ddim_sample(fn, x, 10, steps=5)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------
def test_cfg_identities_and_single_batched_call():
    sched = Schedule(100, "cosine")
    mix = Mixture(sched)
    calls = []

    def model(x, t, y):
        calls.append((x.shape[0], t.shape[0], y.shape[0]))
        return mix.model(x, t, y)

    B = 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, generator=g, dtype=torch.float64) * 2
    t = torch.randint(1, 101, (B,), generator=g)
    y = torch.randint(0, 2, (B,), generator=g)
    null = torch.tensor([Mixture.NULL])                              # batch 1 broadcasts
    cond_eps, uncond_eps = mix.model(x, t, y), mix.uncond(x, t)
    # gamma = 1: the conditional model exactly; gamma = 0: the unconditional one
    assert torch.equal(cfg_model(model, y, null, 1.0)(x, t), cond_eps)
    assert torch.equal(cfg_model(model, y, null, 0.0)(x, t), uncond_eps)
    # general gamma: gamma eps(x, y, t) + (1 - gamma) eps(x, t), from ONE call on the doubled batch
    for gamma in (0.5, 3.0, 7.5):
        calls.clear()
        out = cfg_model(model, y, null, gamma)(x, t)
        assert isinstance(out, torch.Tensor) and out.shape == x.shape
        assert calls == [(2 * B, 2 * B, 2 * B)]
        torch.testing.assert_close(out, gamma * cond_eps + (1 - gamma) * uncond_eps, rtol=1e-12, atol=1e-12)
    # once per step inside a sampler
    calls.clear()
    ddim_sample(cfg_model(model, y, null, 4.0), x, sched, steps=9)
    assert len(calls) == 9 and all(c == (2 * B, 2 * B, 2 * B) for c in calls)


def test_cfg_dict_condition_broadcast_and_negative_prompt():
    sched = Schedule(50)
    mix = Mixture(sched)
    seen = {}

    def model(x, t, c):
        seen["c"] = c
        return mix.model(x, t, c["y"])

    B = 6
    x = torch.randn(B, 2, dtype=torch.float64)
    t = torch.full((B,), 20)
    y = torch.zeros(B, dtype=torch.long)
    cond = {"y": y, "mask": torch.ones(B, 3, dtype=torch.bool), "pooled": None}
    uncond = {"y": torch.tensor([Mixture.NULL]), "mask": torch.zeros(1, 3, dtype=torch.bool), "pooled": None}
    out = cfg_model(model, cond, uncond, 2.0)(x, t)
    assert seen["c"]["y"].tolist() == [0] * B + [Mixture.NULL] * B and seen["c"]["pooled"] is None
    assert seen["c"]["mask"].shape == (2 * B, 3) and seen["c"]["mask"][:B].all() and not seen["c"]["mask"][B:].any()
    torch.testing.assert_close(out, 2 * mix.model(x, t, y) - mix.uncond(x, t))
    # a negative prompt is just the negative condition passed as uncond
    neg = {"y": torch.ones(1, dtype=torch.long), "mask": torch.ones(1, 3, dtype=torch.bool), "pooled": None}
    out = cfg_model(model, cond, neg, 2.0)(x, t)
    torch.testing.assert_close(out, 2 * mix.model(x, t, y) - mix.model(x, t, torch.ones(B, dtype=torch.long)))


def test_cfg_rescale():
    B = 5
    g = torch.Generator().manual_seed(0)
    eps_c = torch.randn(B, 3, 4, 4, generator=g)
    eps_u = 0.5 * torch.randn(B, 3, 4, 4, generator=g)
    def model(x, t, y):                                            # doubled batch: [cond; uncond]
        return torch.where((y == 0).view(-1, 1, 1, 1), torch.cat([eps_c, eps_c]), torch.cat([eps_u, eps_u]))

    x, t = torch.zeros(B, 3, 4, 4), torch.full((B,), 3)
    y, null = torch.zeros(B, dtype=torch.long), torch.ones(1, dtype=torch.long)
    plain = cfg_model(model, y, null, 5.0)(x, t)
    full = cfg_model(model, y, null, 5.0, rescale=1.0)(x, t)
    half = cfg_model(model, y, null, 5.0, rescale=0.5)(x, t)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), eps_c.std(dim=dims))            # std of cond restored
    torch.testing.assert_close(full, plain * (eps_c.std(dim=dims, keepdim=True) / plain.std(dim=dims, keepdim=True)))
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)
    torch.testing.assert_close(cfg_model(model, y, null, 5.0, rescale=0.0)(x, t), plain)


def test_cfg_bad_inputs():
    model = lambda x, t, c: x                                       # noqa: E731
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="scale"):
        cfg_model(model, y, y, -1.0)
    with pytest.raises(ValueError, match="rescale"):
        cfg_model(model, y, y, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="both"):
        cfg_model(model, {"y": y}, y, 2.0)
    x, t = torch.zeros(4, 2), torch.full((4,), 1)
    with pytest.raises(ValueError, match="batch"):
        cfg_model(model, y, torch.zeros(3, dtype=torch.long), 2.0)(x, t)
    with pytest.raises(ValueError, match="keys"):
        cfg_model(model, {"y": y}, {"z": y}, 2.0)(x, t)


def _guided_problem(n, **mixture):
    """A Mixture(**mixture) on a 200-step cosine schedule, n starting points x_T (seed 0) and
    alternating labels y: sched, mix, x_T, y."""
    sched = Schedule(200, "cosine")
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sched, Mixture(sched, **mixture), x_T, (torch.arange(n) % 2).long()


def _sample(model_fn, x_T, sched, **kw):
    """DDPM samples from x_T with the noise of seed 1 (the same for every guided run compared)."""
    return ddpm_sample(model_fn, x_T, sched, generator=torch.Generator().manual_seed(1), **kw)


def _scores(mix, x, y):
    """(fraction of samples on the side of their own component (means +-mu along dim 0), mean exact
    log p(y | x_0))."""
    right = ((x[:, 0] * (1 - 2 * y.double())) > 0).double().mean().item()
    return right, mix.clean_log_post(x, y).mean().item()


def test_cfg_sampling_on_mixture():
    sched, mix, x_T, y = _guided_problem(2000)
    null = torch.tensor([Mixture.NULL])
    out = {gamma: _scores(mix, _sample(cfg_model(mix.model, y, null, gamma), x_T, sched), y)
           for gamma in (0.0, 1.0, 3.0)}
    assert abs(out[0.0][0] - 0.5) < 0.05                           # unconditional: either component
    assert out[1.0][0] >= 0.99                                     # conditional: its own component
    assert out[3.0][0] >= out[1.0][0] and out[3.0][1] > out[1.0][1]   # sharper


# ---------------------------------------------------------------------------------------------
# Classifier guidance
# ---------------------------------------------------------------------------------------------
def test_classifier_guidance_with_exact_posterior_is_conditional_model():
    """eps - gamma sqrt(1 - abar_t) grad log p(y|x_t) with the exact p(y|x_t): gamma = 1 gives the exact
    conditional eps, and for any gamma it equals classifier-free guidance with the exact models."""
    sched = Schedule(100, "cosine")
    mix = Mixture(sched)
    B = 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, generator=g, dtype=torch.float64) * 2
    t = torch.randint(1, 101, (B,), generator=g)
    y = torch.randint(0, 2, (B,), generator=g)
    guided = classifier_guided_model(mix.uncond, mix.log_post, y, 1.0, sched)
    torch.testing.assert_close(guided(x, t), mix.model(x, t, y), rtol=1e-9, atol=1e-9)
    null = torch.tensor([Mixture.NULL])
    for gamma in (0.0, 0.5, 4.0):
        torch.testing.assert_close(classifier_guided_model(mix.uncond, mix.log_post, y, gamma, sched)(x, t),
                                   cfg_model(mix.model, y, null, gamma)(x, t), rtol=1e-9, atol=1e-9)


def test_classifier_guided_sampling_both_forms():
    n = 2000
    sched, mix, x_T, y = _guided_problem(n)
    res = {}
    for gamma in (1.0, 3.0):
        # eps-correction form, any sampler
        x = _sample(classifier_guided_model(mix.uncond, mix.log_post, y, gamma, sched), x_T, sched)
        res["eps", gamma] = _scores(mix, x, y)
        # mean-shift form of the ancestral sampler: x_{t-1} = mu + gamma beta_tilde_t g(mu) + sigma z
        x = _sample(mix.uncond, x_T, sched, classifier_grad=classifier_grad_fn(mix.log_post, y),
                    classifier_scale=gamma)
        res["shift", gamma] = _scores(mix, x, y)
        if gamma == 1.0:                            # the conditional p(x | y) = N(+-mu, s2 I) itself
            signed = x * (1 - 2 * y.double()).unsqueeze(1)
            se = math.sqrt(mix.s2 / n)
            assert (signed.mean(0) - mix.mus[0]).abs().max() < 5 * se + 0.01, signed.mean(0)
            assert (signed.std(0) / math.sqrt(mix.s2) - 1).abs().max() < 5 * math.sqrt(1 / (2 * n)) + 0.02
    for form in ("eps", "shift"):
        assert res[form, 1.0][0] >= 0.99, res
        assert res[form, 3.0][0] >= res[form, 1.0][0] and res[form, 3.0][1] > res[form, 1.0][1], res
    # scale 0: the unconditional sampler, bit for bit
    a = ddpm_sample(mix.uncond, x_T[:50], sched, generator=torch.Generator().manual_seed(2),
                    classifier_grad=classifier_grad_fn(mix.log_post, y[:50]), classifier_scale=0.0)
    b = ddpm_sample(mix.uncond, x_T[:50], sched, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_mean_shift_form_tracks_eps_correction_form():
    """The ancestral mean shift x_{t-1} = mu + gamma beta_tilde_t g(mu) is the first-order equivalent
    of the eps correction: with the same noise, the two chains end close together, path by path
    (overlapping components, so the guidance does real work: a 20% larger shift is 6x farther)."""
    sched, mix, x_T, y = _guided_problem(1000, mu=(1.0, 0.0))
    a = _sample(classifier_guided_model(mix.uncond, mix.log_post, y, 1.0, sched), x_T, sched)
    b = _sample(mix.uncond, x_T, sched, classifier_grad=classifier_grad_fn(mix.log_post, y), classifier_scale=1.0)
    assert (a - b).norm(dim=1).mean().item() < 0.02


def test_classifier_gradient_touches_no_parameter():
    """grad w.r.t. x only: a classifier module's parameters keep .grad None, also under no_grad."""
    sched = Schedule(20)
    clf = torch.nn.Linear(2, 2).double()
    log_prob = lambda x, t, y: clf(x).log_softmax(-1)[torch.arange(x.shape[0], device=x.device), y]  # noqa: E731
    y = torch.zeros(8, dtype=torch.long)
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 5)
    fn = classifier_guided_model(lambda x, t: torch.zeros_like(x), log_prob, y, 2.0, sched)
    with torch.no_grad():
        out = fn(x, t)
    assert not out.requires_grad
    assert all(p.grad is None for p in clf.parameters())
    # the gradient is the analytic one: d/dx log softmax(W x + b)_y = W_y - sum_k p_k W_k
    p = clf(x).softmax(-1)
    W = clf.weight
    grad = (W[0] - p @ W).detach()
    torch.testing.assert_close(out, -2.0 * math.sqrt(1 - sched.abar[5].item()) * grad)
    ddpm_sample(lambda x, t: torch.zeros_like(x), x, sched, classifier_grad=classifier_grad_fn(log_prob, y),
                classifier_scale=1.0)
    assert all(p.grad is None for p in clf.parameters())
    with pytest.raises(ValueError, match="scale"):
        classifier_guided_model(lambda x, t: x, log_prob, y, -0.5, sched)
    with pytest.raises(ValueError, match="per-sample"):
        classifier_grad_fn(lambda x, t, y: x.sum(), y)(x, t)


@pytest.mark.gpu
def test_samplers_on_cuda_with_cpu_generator():
    sched = Schedule(50)
    fn = gaussian_eps(sched, 0.0, 0.5)
    x_T = torch.randn(16, 2, device="cuda")
    for x in (ddpm_sample(fn, x_T, sched, generator=torch.Generator().manual_seed(0)),
              ddim_sample(fn, x_T, sched, steps=10, eta=1.0, generator=torch.Generator().manual_seed(0)),
              langevin_sample(fn, x_T, sched, steps=10, generator=torch.Generator("cuda").manual_seed(0))):
        assert x.device.type == "cuda" and torch.isfinite(x).all()
    mix = Mixture(sched)
    y = torch.zeros(16, dtype=torch.long, device="cuda")
    mix.mus = mix.mus.cuda()
    fn = cfg_model(mix.model, y, torch.tensor([2], device="cuda"), 3.0)
    out = fn(x_T.double(), torch.full((16,), 5, device="cuda"))
    assert out.device.type == "cuda"
