"""The diffusion math against hand-checked values and closed forms (CPU, fast).

Closed forms used here are derived in this file independently of framework/diffusion/process.py:
for Gaussian data x_0 ~ N(m, s^2 I),
    x_t ~ N(sqrt(abar) m, v I),  v = abar s^2 + 1 - abar
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / v
    E[x_0 | x_t] = m + sqrt(abar) s^2 (x_t - sqrt(abar) m) / v
and the posterior q(x_{t-1} | x_t, x_0) from Bayes' rule (precisions add).
"""
import math

import numpy as np
import pytest
import torch

from framework.config import DiffusionConfig
from framework.diffusion.process import (Schedule, as_eps_model, discretized_gaussian_log_likelihood, elbo,
                                 eps_from_pred, eps_from_score, eps_from_x0, lt_weight,
                                 min_snr_weight, normal_kl, p_mean_from_eps, q_posterior, q_sample,
                                 sample_t, score_from_eps, training_loss, training_target,
                                 v_from_eps, x0_from_eps, x0_from_pred)


def gaussian_eps(sched, m, s2):
    """The optimal eps predictor for x_0 ~ N(m, s2 I)."""
    def fn(x, t):
        a = sched.gather(sched.abar, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s2 + 1 - a)
    return fn


def abar_ref(betas):
    """abar_t for t = 0..T from beta_1..beta_T, by hand (numpy)."""
    return np.concatenate([[1.0], np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))])




# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
def test_linear_schedule_hand_values():
    s = Schedule(10, "linear", 1e-3, 0.1)
    betas = np.linspace(1e-3, 0.1, 10)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (11,)
    assert s.betas[0] == 0 and s.abar[0] == 1 and s.alphas[0] == 1
    assert s.betas[1].item() == pytest.approx(1e-3, rel=1e-12)
    assert s.betas[10].item() == pytest.approx(0.1, rel=1e-12)
    np.testing.assert_allclose(s.betas[1:].numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(s.alphas.numpy(), 1 - s.betas.numpy(), rtol=0, atol=0)
    a = abar_ref(betas)
    np.testing.assert_allclose(s.abar.numpy(), a, rtol=1e-12)
    np.testing.assert_allclose(s.abar_prev[1:].numpy(), a[:-1], rtol=1e-12)
    assert torch.all(s.abar[1:] < s.abar[:-1])
    # abar_2 by hand
    assert s.abar[2].item() == pytest.approx((1 - 1e-3) * (1 - (1e-3 + 0.099 / 9)), rel=1e-12)
    # beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t; beta_tilde_1 = 0 exactly
    bt = (1 - a[:-1]) / (1 - a[1:]) * betas
    np.testing.assert_allclose(s.beta_tilde[1:].numpy(), bt, rtol=1e-12)
    assert s.beta_tilde[1].item() == 0.0
    assert torch.all(s.beta_tilde[2:] > 0) and torch.all(s.beta_tilde[1:] <= s.betas[1:])
    # clipped log-variance: t = 1 takes beta_tilde_2 (improved DDPM); all finite
    assert s.log_beta_tilde_clipped[1].item() == pytest.approx(math.log(bt[1]), rel=1e-12)
    np.testing.assert_allclose(s.log_beta_tilde_clipped[2:].numpy(), np.log(bt[1:]), rtol=1e-12)
    for name in Schedule.TABLES:
        tab = getattr(s, name)
        assert tab.dtype == torch.float64 and tab.shape == (11,), name
        assert torch.isfinite(tab[1:]).all(), name


def test_cosine_schedule_follows_cos2_with_clipping():
    T, s_ = 50, 0.008
    s = Schedule(T, "cosine")
    t = np.arange(T + 1)
    f = np.cos((t / T + s_) / (1 + s_) * np.pi / 2) ** 2
    ref = f / f[0]
    betas = 1 - ref[1:] / ref[:-1]
    clipped = betas > 0.999
    assert clipped[-1] and clipped.sum() == 1                      # only beta_T hits the clip
    assert s.betas[T].item() == pytest.approx(0.999, rel=1e-12)
    assert torch.all(s.betas <= 0.999)
    np.testing.assert_allclose(s.abar[:T].numpy(), ref[:T], rtol=1e-10)   # cos^2 formula
    assert s.abar[T].item() == pytest.approx(ref[T - 1] * 0.001, rel=1e-10)   # clipped last step
    assert s.abar[0] == 1 and torch.all(s.abar[1:] < s.abar[:-1]) and s.abar[T] > 0


def test_from_config_and_repr():
    s = Schedule.from_config(DiffusionConfig(timesteps=64, schedule="cosine"))
    assert s.T == 64 and s.kind == "cosine"
    s = Schedule.from_config(DiffusionConfig())
    assert s.T == 1000 and s.betas[1].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.abar[-1] < 1e-4                                        # x_T ~ N(0, I) for the defaults
    assert "T=1000" in repr(s)


@pytest.mark.parametrize("kwargs", [dict(T=1), dict(T=10.0), dict(T=10, kind="quadratic"),
                                    dict(T=10, beta_start=0.0), dict(T=10, beta_start=0.3, beta_end=0.2),
                                    dict(T=10, beta_end=1.0)])
def test_bad_schedule(kwargs):
    with pytest.raises(ValueError):
        Schedule(**kwargs)


def test_posterior_matches_bayes_and_lecture_eps_form():
    s = Schedule(20, "linear", 1e-3, 0.2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 5, 10, 19, 20])
    x_t = q_sample(s, x0, t, eps)
    mean, var = q_posterior(s, x0, x_t, t)
    assert mean.shape == x0.shape and var.shape == (6, 1, 1, 1)
    # Bayes: q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
    a = abar_ref(s.betas[1:].numpy())
    for i, ti in enumerate(t.tolist()):
        beta, alpha, ap = s.betas[ti].item(), 1 - s.betas[ti].item(), a[ti - 1]
        if ti == 1:                                 # x_{t-1} = x_0 exactly: a point mass
            torch.testing.assert_close(mean[i], x0[i], rtol=1e-12, atol=1e-12)
            assert var[i].item() == 0
            continue
        prec = alpha / beta + 1 / (1 - ap)
        m_ref = (math.sqrt(alpha) / beta * x_t[i] + math.sqrt(ap) / (1 - ap) * x0[i]) / prec
        torch.testing.assert_close(mean[i], m_ref, rtol=1e-10, atol=1e-10)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
    # lecture: mu_tilde = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - abar_t) eps)
    torch.testing.assert_close(mean, p_mean_from_eps(eps, x_t, t, s), rtol=1e-10, atol=1e-10)


def test_q_sample_formula_dtypes_and_t_broadcast():
    s = Schedule(100, "cosine")
    for dtype in (torch.float32, torch.float64):
        x0 = torch.randn(4, 2, 3, dtype=dtype)
        eps = torch.randn(4, 2, 3, dtype=dtype)
        t = torch.tensor([0, 1, 50, 100])
        x_t = q_sample(s, x0, t, eps)
        assert x_t.dtype == dtype and x_t.shape == x0.shape
        a = s.abar[t].to(dtype).view(4, 1, 1)
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
        torch.testing.assert_close(x_t[0], x0[0])                  # t = 0 is clean data
        # an int t broadcasts to the batch
        torch.testing.assert_close(q_sample(s, x0, 7, eps), q_sample(s, x0, torch.full((4,), 7), eps))
    # statistics: x_t | x_0 ~ N(sqrt(abar) x_0, 1 - abar)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    x_t = q_sample(s, x0, 30, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    a = s.abar[30].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=4 * math.sqrt((1 - a) / 20000))
    assert x_t.var().item() == pytest.approx(1 - a, rel=4 * math.sqrt(2 / 20000))


def test_gather_shapes_and_cast():
    s = Schedule(10)
    like = torch.zeros(3, 2, 5, 5, dtype=torch.float32)
    v = s.gather(s.abar, torch.tensor([0, 5, 10]), like)
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float32 and v.device == like.device
    assert v[0].item() == 1.0
    v = s.gather(s.abar, torch.tensor([3]), torch.zeros(2, 7, dtype=torch.float64))
    assert v.shape == (2, 1) and v.dtype == torch.float64


def test_sample_t_range_dtype_determinism():
    t = sample_t(3000, 5, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (3000,)
    assert set(t.tolist()) == {1, 2, 3, 4, 5}
    t1 = sample_t(64, 1000, generator=torch.Generator().manual_seed(3))
    t2 = sample_t(64, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.min() >= 1 and t1.max() <= 1000
    assert sample_t(8, Schedule(10)).max() <= 10                   # a Schedule works as T
    assert sample_t(4, 10, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError):
        sample_t(4, 0)


# ---------------------------------------------------------------------------------------------
# Conversions and the score
# ---------------------------------------------------------------------------------------------
def test_prediction_conversions_round_trip():
    s = Schedule(50, "cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 25, 49, 50])
    x_t = q_sample(s, x0, t, eps)
    a = s.abar[t].view(5, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0                        # Salimans & Ho
    torch.testing.assert_close(v_from_eps(eps, x0, t, s), v)
    for pred, kind in ((eps, "eps"), (v, "v"), (x0, "x0")):
        torch.testing.assert_close(training_target(s, x0, t, eps, kind), pred)
        torch.testing.assert_close(eps_from_pred(pred, x_t, t, s, kind), eps, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0_from_pred(pred, x_t, t, s, kind), x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x0_from_eps(eps, x_t, t, s), x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(eps_from_x0(x0, x_t, t, s), eps, rtol=1e-9, atol=1e-9)
    # as_eps_model turns a v / x0 model into an eps model
    v_model = lambda x, tt: v                                       # noqa: E731
    torch.testing.assert_close(as_eps_model(v_model, s, "v")(x_t, t), eps, rtol=1e-9, atol=1e-9)
    score = score_from_eps(eps, t, s)
    torch.testing.assert_close(score, -eps / (1 - a).sqrt())
    torch.testing.assert_close(eps_from_score(score, t, s), eps)


def test_score_of_optimal_model_equals_analytic_grad_log_density():
    """score_from_eps(E[eps|x_t]) == grad_x log q(x_t), by autograd of the analytic log-density,
    for Gaussian data and for a two-component Gaussian mixture."""
    s = Schedule(100, "cosine")
    m, s2 = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.3
    mus = torch.tensor([[1.5, 0.0], [-1.5, 0.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 1.5
    t = torch.randint(1, 101, (64,), generator=g)
    a = s.abar[t].view(-1, 1)
    v = a * s2 + 1 - a

    def log_q_gauss(x):
        return (-0.5 * ((x - a.sqrt() * m) ** 2) / v - 0.5 * torch.log(2 * math.pi * v)).sum(1)

    def log_q_mix(x):
        comps = [(-0.5 * ((x - a.sqrt() * mu) ** 2) / v - 0.5 * torch.log(2 * math.pi * v)).sum(1)
                 for mu in mus]
        return torch.logsumexp(torch.stack(comps, 1), 1) - math.log(2)

    def eps_mix(x, t):
        a = s.gather(s.abar, t, x)
        v = a * s2 + 1 - a
        eps_c = torch.stack([(1 - a).sqrt() * (x - a.sqrt() * mu) / v for mu in mus], 1)   # (B, 2, D)
        logits = torch.stack([(-0.5 * (x - a.sqrt() * mu) ** 2 / v).sum(1) for mu in mus], 1)
        w = torch.softmax(logits, 1)                                                         # p(y|x_t)
        return (w.unsqueeze(-1) * eps_c).sum(1)

    for log_q, eps_fn in ((log_q_gauss, gaussian_eps(s, m, s2)), (log_q_mix, eps_mix)):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_q(xg).sum(), xg)
        torch.testing.assert_close(score_from_eps(eps_fn(x, t), t, s), grad, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def test_training_loss_per_sample_mean_and_weights():
    s = Schedule(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 10, 50, 100])
    out = eps + 0.1 * torch.arange(4.0).view(4, 1, 1, 1)
    loss = training_loss(s, out, x0, t, eps)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, 0.01 * torch.arange(4.0) ** 2)
    assert training_loss(s, eps, x0, t, eps).abs().max() == 0      # perfect prediction
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    torch.testing.assert_close(training_loss(s, out, x0, t, eps, weights=w), loss * w)
    # bf16 output: computed in float32
    assert training_loss(s, out.bfloat16(), x0, t, eps).dtype == torch.float32
    assert training_loss(s, out.double(), x0.double(), t, eps.double()).dtype == torch.float64


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weight_is_x0_space_weight(prediction):
    """min-SNR-gamma (Hang et al.): for every parameterisation the weighted loss equals
    min(SNR_t, gamma) * ||x0_hat - x0||^2 (mean over dims), with x0_hat implied by the output."""
    s = Schedule(200, "cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 5, 40, 100, 170, 200])
    x_t = q_sample(s, x0, t, eps)
    out = training_target(s, x0, t, eps, prediction) + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat = x0_from_pred(out, x_t, t, s, prediction)
    snr = s.abar[t] / (1 - s.abar[t])
    gamma = 5.0
    loss = training_loss(s, out, x0, t, eps, prediction, min_snr_gamma=gamma)
    ref = snr.clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, ref, rtol=1e-7, atol=1e-10)
    # gamma above every SNR: eps weight 1
    if prediction == "eps":
        big = training_loss(s, out, x0, t, eps, min_snr_gamma=1e30)
        torch.testing.assert_close(big, training_loss(s, out, x0, t, eps))
    w = min_snr_weight(s, t, gamma, prediction)
    assert w.shape == (6,) and w.dtype == torch.float32


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_lt_weight_gives_the_lecture_kl(prediction):
    """D * training_loss(weights=lt_weight) == KL(q(x_{t-1}|x_t,x_0) || N(mu_theta, beta_tilde_t I))."""
    s = Schedule(50, "linear", 1e-3, 0.3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([2, 3, 20, 49, 50])
    x_t = q_sample(s, x0, t, eps)
    out = training_target(s, x0, t, eps, prediction) + 0.2 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    D = x0[0].numel()
    weighted = D * training_loss(s, out, x0, t, eps, prediction, weights=lt_weight(s, t, prediction, torch.float64))
    mu_tilde, var = q_posterior(s, x0, x_t, t)
    mu_theta = p_mean_from_eps(eps_from_pred(out, x_t, t, s, prediction), x_t, t, s)
    kl = normal_kl(mu_tilde, var.log(), mu_theta, var.log()).flatten(1).sum(1)
    torch.testing.assert_close(weighted, kl, rtol=1e-8, atol=1e-12)
    # the lecture's formula by hand at one t
    ti = 20
    alpha, ab = 1 - s.betas[ti].item(), s.abar[ti].item()
    ref = (1 - alpha) ** 2 / (2 * s.beta_tilde[ti].item() * alpha * (1 - ab))
    assert lt_weight(s, torch.tensor([ti])).item() == pytest.approx(ref, rel=1e-6)
    assert torch.isfinite(lt_weight(s, torch.tensor([1]))).all()   # t = 1: clipped variance


# ---------------------------------------------------------------------------------------------
# ELBO
# ---------------------------------------------------------------------------------------------
def _phi(z):
    """Standard normal CDF, accurate in the lower tail (erfc)."""
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(z) / math.sqrt(2.0))


def _bin_prob(lo, hi):
    """P(lo < Z < hi) for arrays lo < hi, on the side of the tail where it does not cancel."""
    return np.where(lo > 0, _phi(-lo) - _phi(-hi), _phi(hi) - _phi(lo))


def test_elbo_of_gaussian_model_matches_closed_form():
    """Each term of the ELBO of the optimal model for Gaussian data against its closed form:
    L_T exactly; every L_t (t = 2..T) and L_0 against the exact expectation over x_t, within the
    Monte-Carlo standard error of elbo's one-draw-per-sample estimate (5 sigma)."""
    T, m, s2 = 40, 0.1, 0.09
    s = Schedule(T, "linear", 1e-3, 0.35)
    betas = s.betas[1:].numpy()
    a = abar_ref(betas)
    ks = [0, 40, 127, 128, 230, 255]                                 # 8-bit levels, both edges
    vals = np.array([-1 + 2 * k / 255 for k in ks])
    R, D = 1500, 2
    x0_rows = np.stack([vals, vals[::-1]], 1)                        # (6, 2)
    x0 = torch.tensor(np.repeat(x0_rows, R, 0))                      # (6R, 2)
    bpd, terms = elbo(gaussian_eps(s, m, s2), x0, s, generator=torch.Generator().manual_seed(0),
                      return_terms=True)
    to_bpd = 1 / (D * math.log(2))
    assert bpd.shape == (6 * R,) and bpd.dtype == torch.float64
    assert terms["vb"].shape == (6 * R, T - 1) and terms["t"].tolist() == list(range(2, T + 1))
    torch.testing.assert_close(bpd, terms["prior"] + terms["vb"].sum(1) + terms["decoder"])

    # L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), per dim
    aT = a[T]
    prior = 0.5 * (aT * x0_rows ** 2 + (1 - aT) - 1 - math.log(1 - aT))
    np.testing.assert_allclose(terms["prior"].view(6, R)[:, 0].numpy(), prior.sum(1) * to_bpd, rtol=1e-8, atol=1e-15)

    def check(est, mean, var, what):
        """est (6R,) one-draw estimates; mean/var (6,) exact per-row expectation / variance."""
        got = est.view(6, R).mean(1).numpy()
        se = np.sqrt(var / R)
        assert np.all(np.abs(got - mean) <= 5 * se + 1e-12), (what, got, mean, se)

    # L_t: posterior by Bayes; model mean = E[mu_tilde | x_t] = c0 E[x0 | x_t] + c1 x_t, so
    # mu_tilde - mu_theta = c0 (x0 - E[x0|x_t]) = c0 ((1 - r sqrt(a)) (x0 - m) - r sqrt(1-a) z)
    vb = terms["vb"]
    total_mean, total_var = np.zeros(6), np.zeros(6)
    for j, t in enumerate(range(2, T + 1)):
        beta, alpha, ab, ap = betas[t - 1], 1 - betas[t - 1], a[t], a[t - 1]
        var_tilde = 1 / (alpha / beta + 1 / (1 - ap))
        c0 = var_tilde * math.sqrt(ap) / (1 - ap)
        r = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)
        mu_d = c0 * (1 - r * math.sqrt(ab)) * (x0_rows - m)               # (6, D)
        sd_d = c0 * r * math.sqrt(1 - ab)
        k = 1 / (2 * var_tilde)
        mean = (k * (mu_d ** 2 + sd_d ** 2)).sum(1) * to_bpd
        var = (k ** 2 * (2 * sd_d ** 4 + 4 * mu_d ** 2 * sd_d ** 2)).sum(1) * to_bpd ** 2
        check(vb[:, j], mean, var, f"L_{t}")
        total_mean, total_var = total_mean + mean, total_var + var
    check(vb.sum(1), total_mean, total_var, "sum of L_t")           # independent draws per t

    # L_0: E_{x_1} -log P(x0 | x_1), discretized Gaussian with mean E[x0|x_1], variance beta_tilde_2,
    # by Gauss-Hermite quadrature over x_1 = sqrt(a1) x0 + sqrt(1 - a1) z
    a1 = a[1]
    sigma = math.sqrt(1 / ((1 - betas[1]) / betas[1] + 1 / (1 - a[1])))   # sqrt(beta_tilde_2)
    z, wz = np.polynomial.hermite_e.hermegauss(80)
    wz = wz / wz.sum()
    r1 = math.sqrt(a1) * s2 / (a1 * s2 + 1 - a1)
    h = 1 / 255
    mean, second = np.zeros(6), np.zeros(6)
    for i in range(6):
        nll_rows = np.zeros_like(z)
        for x in x0_rows[i]:
            mu = m + r1 * (math.sqrt(a1) * x + math.sqrt(1 - a1) * z - math.sqrt(a1) * m)
            if x < -0.999:
                p = _phi((x + h - mu) / sigma)
            elif x > 0.999:
                p = _phi(-(x - h - mu) / sigma)
            else:
                p = _bin_prob((x - h - mu) / sigma, (x + h - mu) / sigma)
            nll_rows += -np.log(p)
        mean[i] = (wz * nll_rows).sum() * to_bpd
        second[i] = (wz * nll_rows ** 2).sum() * to_bpd ** 2
    check(terms["decoder"], mean, second - mean ** 2 + 1e-18, "L_0")


def test_elbo_decoder_term_exact():
    """L_0 = -log p(x0 | x1) with a model whose mean mu_theta(x1, 1) = c does not depend on x1:
    the term is deterministic; compare with the discretized Gaussian N(c, beta_tilde_2) by hand."""
    s = Schedule(20, "cosine")
    betas = s.betas[1:].numpy()
    a = abar_ref(betas)
    sigma = math.sqrt(1 / ((1 - betas[1]) / betas[1] + 1 / (1 - a[1])))   # sqrt(beta_tilde_2), Bayes
    levels = np.array([-1, -1 + 2 / 255, -0.2, 0.0 + 1 / 255, 0.6, 1.0])
    c = torch.tensor([[-0.97, -1.0, -0.2 + 0.5 * sigma, 0.05, 0.6 - 2 * sigma, 0.98]], dtype=torch.float64)
    x0 = torch.tensor(levels).view(1, 6).repeat(3, 1)

    def const_x0_model(x, t):                       # eps such that x0_hat = c, i.e. mu_theta(x1, 1) = c
        ab = s.gather(s.abar, t, x)
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    _, terms = elbo(const_x0_model, x0, s, generator=torch.Generator().manual_seed(0), return_terms=True)
    h, cc = 1 / 255, c[0].numpy()
    p = np.where(levels < -0.999, _phi((levels + h - cc) / sigma),
                 np.where(levels > 0.999, _phi(-(levels - h - cc) / sigma),
                          _bin_prob((levels - h - cc) / sigma, (levels + h - cc) / sigma)))
    ref = -np.log(p).sum() / (6 * math.log(2))
    np.testing.assert_allclose(terms["decoder"].numpy(), ref, rtol=1e-9)


def test_elbo_stride_weights_and_inputs():
    s = Schedule(30, "cosine")
    fn = gaussian_eps(s, 0.0, 0.2)
    x0 = torch.zeros(200, 3, dtype=torch.float32)
    full = elbo(fn, x0, s, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    strided = []
    for _ in range(40):
        bpd, terms = elbo(fn, x0, s, generator=g, t_stride=4, return_terms=True)
        t, w = terms["t"].tolist(), terms["weight"].tolist()
        assert w == [4] * 7 + [1] and sum(w) == 29                  # every t = 2..T in one stratum
        assert all(2 + 4 * j <= tj < 2 + 4 * j + wj for j, (tj, wj) in enumerate(zip(t, w)))
        strided.append(bpd.mean().item())
    # stratified sampling is unbiased for the sum over t
    se = np.std(strided) / math.sqrt(len(strided))
    assert abs(np.mean(strided) - full.mean().item()) < 4 * se + 0.01 * full.mean().item()
    assert full.dtype == torch.float64 and torch.isfinite(full).all()
    with pytest.raises(ValueError):
        elbo(fn, x0 + 2.0, s)                                        # outside [-1, 1]
    with pytest.raises(ValueError):
        elbo(fn, x0, s, t_stride=0)
    # v-model: same bound as its eps model
    from framework.diffusion.process import v_from_eps as vfe
    def v_model(x, t):
        eps = fn(x, t)
        return vfe(eps, x0_from_eps(eps, x, t, s), t, s)
    torch.testing.assert_close(elbo(v_model, x0, s, generator=torch.Generator().manual_seed(0), prediction="v"),
                               full, rtol=1e-5, atol=1e-6)


def test_discretized_likelihood_sums_to_one():
    """The 256 bins of the discretized Gaussian decoder partition the real line."""
    levels = torch.tensor([-1 + 2 * k / 255 for k in range(256)], dtype=torch.float64)
    for mean, log_scale in ((0.3, math.log(0.05)), (-0.99, math.log(0.01)), (0.0, math.log(2.0))):
        lp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                 torch.full_like(levels, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_elbo_import_path():
    from framework.diffusion.process import elbo as e
    assert callable(e)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    s = Schedule(10)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="out of range"):
        q_sample(s, x0, torch.tensor([1, 2, 3, 11]), eps)
    with pytest.raises(ValueError, match="out of range"):
        training_loss(s, eps, x0, torch.tensor([0, 1, 2, 3]), eps)  # t = 0 is not a training step
    with pytest.raises(ValueError, match="out of range"):
        q_sample(s, x0, -1, eps)
    with pytest.raises(ValueError, match="integer"):
        q_sample(s, x0, t.float(), eps)
    with pytest.raises(ValueError, match="shape"):
        q_sample(s, x0, torch.tensor([1, 2, 3]), eps)
    with pytest.raises(ValueError, match="shape mismatch"):
        q_sample(s, x0, t, torch.randn(4, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        training_loss(s, torch.randn(4, 2), x0, t, eps)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        training_loss(s, eps, x0, t, eps, min_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="prediction"):
        training_loss(s, eps, x0, t, eps, prediction="score")
    with pytest.raises(ValueError, match="weights"):
        training_loss(s, eps, x0, t, eps, weights=torch.ones(3))
    with pytest.raises(TypeError, match="Schedule"):
        score_from_eps(s, t, eps)                                    # swapped arguments
    with pytest.raises(TypeError, match="Schedule"):
        q_sample(x0, s, t, eps)


@pytest.mark.gpu
def test_device_agnostic_cuda():
    s = Schedule(10)
    x0 = torch.randn(4, 3, device="cuda")
    t = sample_t(4, 10, generator=torch.Generator().manual_seed(0), device="cuda")
    x_t = q_sample(s, x0, t, torch.randn_like(x0))
    assert x_t.device.type == "cuda"
    assert training_loss(s, x_t, x0, t, x_t).device.type == "cuda"
    assert lt_weight(s, t).device.type == "cuda"
    b = elbo(gaussian_eps(s, 0.0, 0.1), x0.clamp(-1, 1), s, generator=torch.Generator("cuda").manual_seed(0))
    assert b.device.type == "cuda" and torch.isfinite(b).all()
