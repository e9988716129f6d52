"""Samplers and guidance, in the notation of the lecture.

Samplers are stateless functions `(model_fn, x_T, sched, ...) -> x_0`; guidance is a wrapper around a
model function that returns another model function. A model function is `fn(x, t) -> eps` with x
(B, ...) and t an int64 (B,) tensor of timesteps in 1..T (samplers accept v / x0 models through
`prediction=`). Noise comes from `generator` when given (drawn on the generator's device, moved to
x's device), so the same seed gives the same samples. Run samplers in float32 or float64: the model
output is cast to x's dtype at every step.

No deepspeed, no data.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from framework.diffusion.process import (Schedule, check_schedule, randn_like, as_eps_model, check_t, eps_from_x0,
                        p_mean_from_eps, q_posterior, score_from_eps, x0_from_eps)

__all__ = [
    "timesteps", "ddpm_sample", "ddim_sample", "langevin_sample",
    "cfg_model", "classifier_grad_fn", "classifier_guided_model",
]

Cond = Union[torch.Tensor, dict]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _check_x(x_T: torch.Tensor) -> None:
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
        raise ValueError("x_T must be a floating tensor (B, ...)")


def timesteps(T: int, steps: int) -> list[int]:
    """A strided subset T = t_0 > t_1 > ... > t_steps = 0 ("trailing": starts at T, where x_T ~ N(0,I),
    and ends at clean data), t_i = floor(T (steps - i) / steps). steps = T gives every timestep."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..T={T}, got {steps!r}")
    return [(T * (steps - i)) // steps for i in range(steps + 1)]


def _eval(fn: Callable, x: torch.Tensor, t_int: int) -> torch.Tensor:
    t = torch.full((x.shape[0],), t_int, dtype=torch.int64, device=x.device)
    out = fn(x, t)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return out.to(x.dtype)


def _steps_iter(seq, progress: bool, desc: str):
    if progress:
        try:
            from tqdm.auto import tqdm
            return tqdm(seq, desc=desc, leave=False)
        except ImportError:  # pragma: no cover
            pass
    return seq


# ---------------------------------------------------------------------------------------------
# DDPM ancestral sampling
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm_sample(model_fn: Callable, x_T: torch.Tensor, sched: Schedule, *,
                generator: Optional[torch.Generator] = None,
                classifier_grad: Optional[Callable] = None, classifier_scale: float = 0.0,
                prediction: str = "eps", clip_x0: Optional[float] = None,
                callback: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling (lecture "Sampling", steps 1-3), t = T..1:

        mu_theta = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - abar_t) eps_theta(x_t, t))
        x_{t-1}  = mu_theta + sqrt(beta_tilde_t) z,   z ~ N(0, I);   no noise at t = 1 (beta_tilde_1 = 0)

    Classifier guidance in the mean-shift form (lecture "Guided sampling", steps 3-4): with
    `classifier_grad(x, t) -> grad_x log p(y | x)` at noise level t (e.g. `classifier_grad_fn`),
        g = classifier_grad(mu_theta, t - 1),   x_{t-1} = mu_theta + classifier_scale * sigma^2 * g + sigma z
    with sigma^2 = beta_tilde_t, the variance of p(x_{t-1} | x_t) in the derivation (the slide's
    sqrt(beta_tilde_t) * g is the sigma (.) g of the completed square; completing the square of
    (x - mu) g - ||x - mu||^2 / (2 sigma^2) gives the shift sigma^2 g). At t = 1 the shift vanishes
    (sigma^2 = 0) and g is not evaluated, so the classifier only sees noise levels 1..T-1.

    clip_x0: clamp the implied x_0 to [-clip_x0, clip_x0] and use the posterior mean
    mu_tilde(x_t, x_0_hat) (equal to mu_theta without clipping). callback({"i", "n", "t", "x"})
    after each step; progress=True shows a tqdm bar."""
    check_schedule(sched)
    _check_x(x_T)
    classifier_scale = check_scale("classifier_scale", classifier_scale)
    if classifier_grad is not None and not callable(classifier_grad):
        raise ValueError("classifier_grad must be a callable fn(x, t) -> grad")
    fn = as_eps_model(model_fn, sched, prediction)
    B, T = x_T.shape[0], sched.T
    x = x_T
    for i, t_int in enumerate(_steps_iter(range(T, 0, -1), progress, "ddpm")):
        eps = _eval(fn, x, t_int)                                               # eps_theta(x_t, t)
        if clip_x0 is None:
            mu = p_mean_from_eps(eps, x, t_int, sched)                          # mu_theta(x_t, t)
        else:
            x0 = x0_from_eps(eps, x, t_int, sched).clamp(-clip_x0, clip_x0)
            mu, _ = q_posterior(sched, x0, x, t_int)
        if t_int > 1:
            var = sched.beta_tilde[t_int].item()                                # sigma^2 = beta_tilde_t
            if classifier_grad is not None and classifier_scale > 0:
                t_prev = torch.full((B,), t_int - 1, dtype=torch.int64, device=x.device)
                g = classifier_grad(mu, t_prev)                                 # grad log p(y|x_{t-1}) at mu
                if not isinstance(g, torch.Tensor) or g.shape != x.shape:
                    raise ValueError("classifier_grad must return a tensor shaped like x")
                mu = mu + (classifier_scale * var) * g.to(x.dtype)
            x = mu + math.sqrt(var) * randn_like(x, generator)
        else:
            x = mu
        if callback is not None:
            callback({"i": i, "n": T, "t": t_int, "x": x})
    return x


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(model_fn: Callable, x_T: torch.Tensor, sched: Schedule, steps: int = 50,
                eta: float = 0.0, *, generator: Optional[torch.Generator] = None,
                prediction: str = "eps", clip_x0: Optional[float] = None,
                callback: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021) on the strided subset `timesteps(T, steps)`; from t to s < t:

        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        sigma  = eta * sqrt((1 - abar_s)/(1 - abar_t)) * sqrt(1 - abar_t/abar_s)
        x_s    = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z

    eta = 0: deterministic; eta = 1 with steps = T: the DDPM kernel (sigma^2 = beta_tilde_t), drawing
    the same noise as `ddpm_sample` for the same generator. The last step goes to s = 0 (abar_0 = 1),
    so it returns x0_hat. clip_x0 clamps x0_hat (and eps is recomputed from the clamped x0_hat)."""
    check_schedule(sched)
    _check_x(x_T)
    eta = check_scale("eta", eta)
    ts = timesteps(sched.T, steps)
    fn = as_eps_model(model_fn, sched, prediction)
    x = x_T
    for i in _steps_iter(range(steps), progress, "ddim"):
        t_int, s_int = ts[i], ts[i + 1]
        eps = _eval(fn, x, t_int)
        x0 = x0_from_eps(eps, x, t_int, sched)                                  # x0_hat
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = eps_from_x0(x0, x, t_int, sched)
        a_t, a_s = sched.abar[t_int].item(), sched.abar[s_int].item()
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1.0 - a_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "n": steps, "t": t_int, "x": x, "x0": x0})
    return x


# ---------------------------------------------------------------------------------------------
# Annealed Langevin dynamics with the score (NCSN view)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def langevin_sample(model_fn: Callable, x_T: torch.Tensor, sched: Schedule, n_steps_each: int = 2,
                    snr: float = 0.16, *, generator: Optional[torch.Generator] = None,
                    steps: Optional[int] = None, denoise: bool = True, prediction: str = "eps",
                    callback: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019) with the score of the eps model,
    s_theta(x_t, t) = -eps_theta(x_t, t) / sqrt(1 - abar_t), over the noise levels t = T..1
    (or the strided subset `timesteps(T, steps)` without 0), n_steps_each steps per level:

        x <- x + delta s_theta(x, t) + sqrt(2 delta) z,   z ~ N(0, I)
        delta = 2 alpha_t (snr ||z|| / ||s_theta||)^2    (norms: per-sample L2, averaged over the batch)

    the step-size rule of the Langevin corrector of Song et al. 2021 (so the step depends on the
    batch). The chain ends at level 1 (x ~ q(x_1)); denoise=True returns Tweedie's
    E[x_0 | x_1] = (x_1 + (1 - abar_1) s_theta) / sqrt(abar_1)."""
    check_schedule(sched)
    _check_x(x_T)
    snr = check_scale("snr", snr)
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ValueError(f"n_steps_each must be an int >= 1, got {n_steps_each!r}")
    levels = timesteps(sched.T, steps if steps is not None else sched.T)[:-1]
    fn = as_eps_model(model_fn, sched, prediction)
    x = x_T
    for i, t_int in enumerate(_steps_iter(levels, progress, "langevin")):
        alpha = sched.alphas[t_int].item()
        for _ in range(n_steps_each):
            score = score_from_eps(_eval(fn, x, t_int), t_int, sched)          # s_theta(x_t, t)
            z = randn_like(x, generator)
            grad_norm = score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
            noise_norm = z.flatten(1).norm(dim=1).mean()
            delta = 2.0 * alpha * (snr * noise_norm / grad_norm) ** 2
            x = x + delta * score + torch.sqrt(2.0 * delta) * z
        if callback is not None:
            callback({"i": i, "n": len(levels), "t": t_int, "x": x})
    if denoise:
        x = x0_from_eps(_eval(fn, x, 1), x, 1, sched)
    return x


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------
def _expand_batch(v: torch.Tensor, B: int, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.ndim < 1:
        raise ValueError(f"{name} must be a batched tensor, got {type(v).__name__}")
    if v.shape[0] == B:
        return v
    if v.shape[0] == 1:
        return v.expand(B, *v.shape[1:])
    raise ValueError(f"{name} has batch {v.shape[0]}, expected {B} (or 1 to broadcast)")


def _expand_cond(c: Cond, B: int, name: str) -> Cond:
    if isinstance(c, dict):
        return {k: (None if v is None else _expand_batch(v, B, f"{name}[{k!r}]")) for k, v in c.items()}
    return _expand_batch(c, B, name)


def _cat_cond(cond: Cond, uncond: Cond, B: int) -> Cond:
    """[cond; uncond] along dim 0, each broadcast to batch B (a tensor, or a dict of tensors)."""
    if isinstance(cond, dict) != isinstance(uncond, dict):
        raise ValueError("cond and uncond must both be tensors or both be dicts")
    c, u = _expand_cond(cond, B, "cond"), _expand_cond(uncond, B, "uncond")
    if not isinstance(c, dict):
        return torch.cat([c, u.to(c.device)], 0)
    if set(c) != set(u):
        raise ValueError(f"cond and uncond have different keys: {sorted(c)} vs {sorted(u)}")
    out = {}
    for k in c:
        if (c[k] is None) != (u[k] is None):
            raise ValueError(f"cond[{k!r}] and uncond[{k!r}]: one is None, the other is not")
        out[k] = None if c[k] is None else torch.cat([c[k], u[k].to(c[k].device)], 0)
    return out


def cfg_model(model: Callable, cond: Cond, uncond: Cond, scale: float,
              rescale: float = 0.0) -> Callable:
    """Classifier-free guidance as a model function fn(x, t) -> eps_hat:

        eps_hat = gamma * eps_theta(x_t, y, t) + (1 - gamma) * eps_theta(x_t, t),   gamma = scale

    `model(x, t, cond) -> eps` is called ONCE per step on the batch-concatenated inputs
    ([x; x], [t; t], [cond; uncond]); for a UNet taking keywords pass
    `lambda x, t, c: unet(x, t, **c)` with cond = {"ctx": (B,L,D), "ctx_mask": (B,L)}. cond / uncond
    are tensors or dicts of tensors (None values allowed, matching); a batch of 1 broadcasts to B
    (the one null condition). A negative prompt is the negative condition passed as `uncond`.
    Applied to all output channels. gamma = 1 is the conditional model exactly (one forward on the
    plain batch); gamma = 0 the unconditional one; gamma > 1 extrapolates. Always returns a tensor.

    rescale = phi in [0, 1] (Lin et al. 2023, "Common diffusion noise schedules are flawed"):
        eps_hat <- phi * eps_hat * std(eps_cond) / std(eps_hat) + (1 - phi) * eps_hat,
    with std per sample over all non-batch dims."""
    scale = check_scale("guidance scale", scale)
    rescale = check_scale("rescale", rescale)
    if rescale > 1:
        raise ValueError(f"rescale must be in [0, 1], got {rescale}")
    if isinstance(cond, dict) != isinstance(uncond, dict):
        raise ValueError("cond and uncond must both be tensors or both be dicts")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        t = t.expand(B) if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == 1 else t
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise ValueError(f"t must be an int64 tensor shaped ({B},)")
        if scale == 1.0:                                                        # the conditional model
            return model(x, t, _expand_cond(cond, B, "cond"))
        if scale == 0.0:                                                        # the unconditional model
            return model(x, t, _expand_cond(uncond, B, "uncond"))
        out = model(torch.cat([x, x], 0), torch.cat([t, t], 0), _cat_cond(cond, uncond, B))
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * B:
            raise ValueError(f"model must return a tensor with batch {2 * B} for the doubled batch")
        eps_c, eps_u = out[:B], out[B:]
        guided = scale * eps_c + (1.0 - scale) * eps_u                          # lecture's eps_hat
        if rescale > 0:
            dims = tuple(range(1, guided.ndim))
            std_c = eps_c.std(dim=dims, keepdim=True)
            std_g = guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
            guided = rescale * (guided * (std_c / std_g)) + (1.0 - rescale) * guided
        return guided

    return fn


# ---------------------------------------------------------------------------------------------
# Classifier guidance
# ---------------------------------------------------------------------------------------------
def classifier_grad_fn(log_prob_fn: Callable, y) -> Callable:
    """fn(x, t) -> grad_x log p(y | x, t), from `log_prob_fn(x, t, y) -> (B,)` per-sample
    log-probabilities. The gradient is taken w.r.t. x only (torch.autograd.grad on a detached copy of
    x), so no classifier parameter accumulates a .grad; works inside torch.no_grad()."""
    if not callable(log_prob_fn):
        raise ValueError("log_prob_fn must be a callable (x, t, y) -> (B,) log p(y|x)")

    def grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = log_prob_fn(xg, t, y)
            if not isinstance(lp, torch.Tensor) or lp.shape != (x.shape[0],):
                got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
                raise ValueError(f"log_prob_fn must return per-sample log p(y|x_t) shaped "
                                 f"({x.shape[0]},), got {got}")
            (g,) = torch.autograd.grad(lp.sum(), xg, allow_unused=True)
        return torch.zeros_like(x) if g is None else g.detach().to(x.dtype)

    return grad


def classifier_guided_model(model_fn: Callable, log_prob_fn: Callable, y, scale: float,
                            sched: Schedule) -> Callable:
    """Classifier guidance in the eps-correction form (lecture "Classifier-corrected noise
    prediction"), a model function fn(x, t) -> eps_hat:

        eps_hat = eps_theta(x_t, t) - gamma * sqrt(1 - abar_t) * grad_{x_t} log p(y | x_t)

    i.e. the score of p(x_t | theta) p(y | x_t)^gamma / Z. model_fn must return eps (wrap v / x0
    models with `diffusion.as_eps_model`). `log_prob_fn(x_t, t, y)` returns (B,) log p(y | x_t);
    the gradient is w.r.t. x only (see `classifier_grad_fn`). Works with every sampler."""
    check_schedule(sched)
    scale = check_scale("classifier scale", scale)
    grad_fn = classifier_grad_fn(log_prob_fn, y)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_fn(x, t)
        if scale == 0.0:
            return eps
        t = check_t(sched, t, x)
        g = grad_fn(x, t)
        return eps - (scale * sched.gather(sched.sqrt_one_minus_abar, t, x)) * g.to(eps.dtype)

    return fn
