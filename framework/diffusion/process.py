"""Gaussian diffusion math (DDPM), in the notation of the lecture.

Forward process      q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
Posterior            q(x_{t-1} | x_t, x_0) = N(mu_tilde_t(x_t, x_0), beta_tilde_t I)
Reverse model        p(x_{t-1} | x_t) = N(mu_theta(x_t, t), beta_tilde_t I)   (fixed "small" variance)
                     mu_theta = 1/sqrt(alpha_t) * (x_t - (1 - alpha_t)/sqrt(1 - abar_t) * eps_theta)
Score                s_theta(x_t, t) = -eps_theta(x_t, t) / sqrt(1 - abar_t)

Conventions
-----------
* Integer timesteps t in 1..T as in the lecture; t = 0 is clean data. Every table of `Schedule` is
  float64, indexed by t = 0..T, with beta_0 = 0 and abar_0 = 1. Tables are cast to the dtype and
  device of the tensor they meet at the moment of use (`Schedule.gather`).
* t is an int64 tensor of shape (B,) (a Python int or a 0-d tensor is broadcast to the batch).
  Out-of-range t, float t, or a batch that does not match -> ValueError.
* Argument order: functions of the forward process and the losses take the schedule first
  (`q_sample(sched, x0, t, eps)`); conversions of a model output read like the formula, value
  first and the schedule last (`score_from_eps(eps, t, sched)`). Passing something that is not a
  `Schedule` where one is expected raises TypeError, so a swapped order fails loudly.
* The network is never imported here: functions that need it take `model_fn(x_t, t) -> output`.

This module imports only torch and math.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

__all__ = [
    "Schedule", "PREDICTIONS", "check_t", "check_schedule", "randn_like",
    "q_sample", "q_posterior", "sample_t",
    "training_target", "training_loss", "lt_weight", "min_snr_weight",
    "eps_from_pred", "x0_from_pred", "x0_from_eps", "eps_from_x0", "v_from_eps",
    "score_from_eps", "eps_from_score", "p_mean_from_eps", "as_eps_model",
    "normal_kl", "discretized_gaussian_log_likelihood", "elbo",
]

PREDICTIONS = ("eps", "v", "x0")
TimeLike = Union[int, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------
def _cosine_abar(T: int, s: float = 0.008) -> torch.Tensor:
    """f(t)/f(0) with f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), t = 0..T (Nichol & Dhariwal 2021)."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((t / T + s) / (1 + s)) * (math.pi / 2)) ** 2
    return f / f[0]


class Schedule:
    """The noise schedule and everything derived from it: float64 tables indexed by t = 0..T.

    Tables (shape (T+1,), float64, CPU):
        betas            beta_t (beta_0 = 0)
        alphas           alpha_t = 1 - beta_t
        abar             abar_t = prod_{s<=t} alpha_s (abar_0 = 1)
        abar_prev        abar_{t-1} (abar_prev[0] = 1 by convention)
        sqrt_abar, sqrt_one_minus_abar, snr (= abar / (1 - abar); snr[0] = inf)
        beta_tilde       (1 - abar_{t-1}) / (1 - abar_t) * beta_t; beta_tilde_1 = 0 exactly
                         (q(x_0 | x_1, x_0) is a point mass); beta_tilde_0 = 0 by convention
        log_beta_tilde_clipped
                         log beta_tilde_t with t = 0, 1 replaced by log beta_tilde_2 (improved-DDPM's
                         clipped log-variance: the model variance at t = 1 used by the decoder)
        post_coef_x0     sqrt(abar_{t-1}) beta_t / (1 - abar_t)            } mu_tilde_t(x_t, x_0) =
        post_coef_xt     sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)     }  c_x0 x_0 + c_xt x_t
                         (t = 0: c_x0 = 1, c_xt = 0 by convention)
        recip_sqrt_alpha 1 / sqrt(alpha_t)                                    } mu_theta =
        eps_coef         (1 - alpha_t) / sqrt(1 - abar_t)   (eps_coef[0] = 0) }  r (x_t - e eps)

    Schedules:
        linear: beta_t = linspace(beta_start, beta_end, T) for t = 1..T (DDPM). The endpoints are
                used as given for any T; with small T raise beta_end (or T) so abar_T ~ 0.
        cosine: abar_t = f(t)/f(0) (improved DDPM), beta_t = min(1 - abar_t/abar_{t-1}, max_beta)
                with max_beta = 0.999; the abar table is then recomputed as the cumulative product of
                the clipped alphas, so it follows f(t)/f(0) exactly wherever no clipping happened.
    """

    TABLES = ("betas", "alphas", "abar", "abar_prev", "sqrt_abar", "sqrt_one_minus_abar", "snr",
              "beta_tilde", "log_beta_tilde_clipped", "post_coef_x0", "post_coef_xt",
              "recip_sqrt_alpha", "eps_coef")

    def __init__(self, T: int = 1000, kind: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_s: float = 0.008, max_beta: float = 0.999):
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"Schedule: T must be an int >= 2, got {T!r}")
        if kind == "linear":
            if not (0.0 < beta_start <= beta_end < 1.0):
                raise ValueError("Schedule(linear): need 0 < beta_start <= beta_end < 1, got "
                                 f"beta_start={beta_start}, beta_end={beta_end}")
            b = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "cosine":
            if not (0.0 < max_beta < 1.0) or cosine_s < 0:
                raise ValueError(f"Schedule(cosine): need 0 < max_beta < 1 and s >= 0, "
                                 f"got max_beta={max_beta}, s={cosine_s}")
            f = _cosine_abar(T, cosine_s)
            b = (1.0 - f[1:] / f[:-1]).clamp(min=0.0, max=max_beta)
        else:
            raise ValueError(f"Schedule: kind must be 'linear' or 'cosine', got {kind!r}")
        self.T, self.kind = T, kind
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)

        one = torch.ones(1, dtype=torch.float64)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), b])           # beta_t
        self.alphas = 1.0 - self.betas                                            # alpha_t
        self.abar = torch.cumprod(self.alphas, 0)                                 # abar_t, abar_0 = 1
        self.abar_prev = torch.cat([one, self.abar[:-1]])                         # abar_{t-1}
        self.sqrt_abar = self.abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - self.abar).sqrt()
        self.snr = self.abar / (1.0 - self.abar)                                  # inf at t = 0

        one_minus = 1.0 - self.abar
        safe = torch.where(one_minus > 0, one_minus, one)                          # t = 0 guard
        bt = (1.0 - self.abar_prev) / safe * self.betas                           # beta_tilde_t
        bt[0] = 0.0
        self.beta_tilde = bt                                                      # bt[1] == 0 exactly
        log_bt = torch.log(bt.clamp(min=torch.finfo(torch.float64).tiny))
        log_bt[:2] = math.log(bt[2].item())                                       # clipped, as improved-DDPM
        self.log_beta_tilde_clipped = log_bt

        self.post_coef_x0 = self.abar_prev.sqrt() * self.betas / safe
        self.post_coef_xt = self.alphas.sqrt() * (1.0 - self.abar_prev) / safe
        self.post_coef_x0[0], self.post_coef_xt[0] = 1.0, 0.0
        self.recip_sqrt_alpha = 1.0 / self.alphas.sqrt()
        self.eps_coef = self.betas / safe.sqrt()
        self.eps_coef[0] = 0.0

        if not torch.all(self.abar[1:] < self.abar[:-1]):
            raise ValueError("Schedule: abar must be strictly decreasing (some beta_t == 0)")
        self._cache: dict = {}

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """From a `DiffusionConfig` (timesteps, schedule, beta_start, beta_end)."""
        return cls(T=cfg.timesteps, kind=cfg.schedule, beta_start=cfg.beta_start,
                   beta_end=cfg.beta_end)

    def __repr__(self) -> str:
        return (f"Schedule(T={self.T}, kind={self.kind!r}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}, abar_T={self.abar[-1].item():.3e})")

    # -- indexing --------------------------------------------------------------------------------
    def table(self, table: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        """`table` cast to dtype and moved to device (the float64 original stays on CPU); cached per
        (table, dtype, device) when it is one of this schedule's own tables."""
        device = torch.device(device) if device is not None else table.device
        name = next((n for n in self.TABLES if getattr(self, n) is table), None)
        if name is None:
            return table.to(dtype=dtype).to(device)
        key = (name, dtype, device)
        hit = self._cache.get(key)
        if hit is None:
            hit = table.to(dtype=dtype).to(device)
            self._cache[key] = hit
        return hit

    def gather(self, table: torch.Tensor, t: TimeLike, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, ..., 1) to broadcast against `like` (B, ...), in like's dtype and
        device. t may be 0..T here (tables are indexed 0..T); the public functions that call it have
        checked t's range already, so this checks its shape only (no host read of t)."""
        t = check_t(self, t, like, lo=0, check_range=False)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        v = self.table(table, dtype, like.device)[t]
        return v.view(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def check_schedule(sched) -> Schedule:
    if not isinstance(sched, Schedule):
        raise TypeError(f"expected a Schedule, got {type(sched).__name__} (check the argument order: "
                        "q_sample(sched, x0, t, eps), score_from_eps(eps, t, sched))")
    return sched


def check_t(sched: Schedule, t: TimeLike, like: Optional[torch.Tensor] = None, lo: int = 1,
            batch: Optional[int] = None, check_range: bool = True) -> torch.Tensor:
    """Validate t against the batch (of `like`, or `batch`) and the range lo..T; return int64 (B,)
    on like's device (t's own device when like is None). A Python int or a 0-d / (1,) tensor is
    broadcast to the batch; with neither like nor batch, B is t's length (1 for an int).

    The range check of a tensor reads its min and max on the host: a device synchronisation. The
    framework's own t (drawn in 1..T by the trainer) skips it (``check_range=False``, the public
    functions' ``trusted=True``); user-facing calls keep it. Shape and dtype checks cost nothing."""
    if like is not None:
        if not isinstance(like, torch.Tensor) or like.ndim < 1:
            raise ValueError("expected a batched tensor (B, ...)")
        batch, device = like.shape[0], like.device
    else:
        device = t.device if isinstance(t, torch.Tensor) else None
        if batch is None:
            batch = t.shape[0] if isinstance(t, torch.Tensor) and t.ndim == 1 else 1
    B = batch
    if isinstance(t, bool):
        raise ValueError("t must be an integer timestep, got a bool")
    if isinstance(t, int):
        if not lo <= t <= sched.T:
            raise ValueError(f"timestep out of range: got t={t}, expected {lo}..{sched.T} "
                             f"(T={sched.T}; t=0 is clean data)")
        return torch.full((B,), t, dtype=torch.int64, device=device)
    elif isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor (int64 timesteps in {lo}..{sched.T}), "
                             f"got dtype {t.dtype}")
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1 and B != 1):
            t = t.reshape(1).expand(B)
        if t.ndim != 1 or t.shape[0] != B:
            raise ValueError(f"t must have shape ({B},) to match the batch, got {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.int64)
    else:
        raise ValueError(f"t must be an int or an int64 tensor, got {type(t).__name__}")
    if B > 0 and check_range:
        tmin, tmax = int(t.min()), int(t.max())
        if tmin < lo or tmax > sched.T:
            raise ValueError(f"timestep out of range: got t in [{tmin}, {tmax}], expected "
                             f"{lo}..{sched.T} (T={sched.T}; t=0 is clean data)")
    return t


def _check_same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, ref = items[0]
    if not isinstance(ref, torch.Tensor):
        raise ValueError(f"{name0} must be a tensor")
    for name, x in items[1:]:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
        if x.shape != ref.shape:
            raise ValueError(f"shape mismatch: {name0} {tuple(ref.shape)} vs {name} {tuple(x.shape)}")


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


# ---------------------------------------------------------------------------------------------
# Forward process and posterior
# ---------------------------------------------------------------------------------------------
def q_sample(sched: Schedule, x0: torch.Tensor, t: TimeLike, eps: torch.Tensor, *,
             trusted: bool = False) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a sample of q(x_t | x_0). t in 0..T.
    ``trusted``: t was drawn in range by the caller (no host read of t, see ``check_t``)."""
    check_schedule(sched)
    _check_same_shape(x0=x0, eps=eps)
    t = check_t(sched, t, x0, lo=0, check_range=not trusted)
    return sched.gather(sched.sqrt_abar, t, x0) * x0 + sched.gather(sched.sqrt_one_minus_abar, t, x0) * eps


def q_posterior(sched: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: TimeLike):
    """q(x_{t-1} | x_t, x_0) = N(mean, var I) -> (mean (B, ...), var (B, 1, ..., 1)), t in 1..T.

    mean = mu_tilde_t = sqrt(abar_{t-1}) beta_t/(1-abar_t) x_0 + sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) x_t
    var  = beta_tilde_t (= 0 at t = 1)."""
    check_schedule(sched)
    _check_same_shape(x0=x0, x_t=x_t)
    t = check_t(sched, t, x_t)
    mean = sched.gather(sched.post_coef_x0, t, x_t) * x0 + sched.gather(sched.post_coef_xt, t, x_t) * x_t
    return mean, sched.gather(sched.beta_tilde, t, x_t)


def sample_t(batch: int, T: int, generator: Optional[torch.Generator] = None,
             device=None) -> torch.Tensor:
    """t ~ U{1..T}, int64 (batch,). Drawn on the generator's device, returned on `device`."""
    if isinstance(T, Schedule):
        T = T.T
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    gen_device = generator.device if generator is not None else device
    t = torch.randint(1, T + 1, (batch,), generator=generator, device=gen_device, dtype=torch.int64)
    return t.to(device) if device is not None else t


# ---------------------------------------------------------------------------------------------
# Conversions between eps, x0, v and the score (value first, schedule last)
# ---------------------------------------------------------------------------------------------
def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, t: TimeLike, sched: Schedule) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    check_schedule(sched)
    _check_same_shape(eps=eps, x_t=x_t)
    t = check_t(sched, t, x_t)
    return (x_t - sched.gather(sched.sqrt_one_minus_abar, t, x_t) * eps) / sched.gather(sched.sqrt_abar, t, x_t)


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, t: TimeLike, sched: Schedule) -> torch.Tensor:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    check_schedule(sched)
    _check_same_shape(x0=x0, x_t=x_t)
    t = check_t(sched, t, x_t)
    return (x_t - sched.gather(sched.sqrt_abar, t, x_t) * x0) / sched.gather(sched.sqrt_one_minus_abar, t, x_t)


def v_from_eps(eps: torch.Tensor, x0: torch.Tensor, t: TimeLike, sched: Schedule, *,
               trusted: bool = False) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
    check_schedule(sched)
    _check_same_shape(eps=eps, x0=x0)
    t = check_t(sched, t, x0, check_range=not trusted)
    return sched.gather(sched.sqrt_abar, t, x0) * eps - sched.gather(sched.sqrt_one_minus_abar, t, x0) * x0


def _from_pred(pred: torch.Tensor, x_t: torch.Tensor, t: TimeLike, sched: Schedule, prediction: str,
               want: str) -> torch.Tensor:
    """The `want` (eps | x0) implied by a model output of kind `prediction` (eps | v | x0) at x_t."""
    check_schedule(sched)
    _check_prediction(prediction)
    _check_same_shape(pred=pred, x_t=x_t)
    t = check_t(sched, t, x_t)
    if prediction == want:
        return pred
    if prediction != "v":                       # the other one of eps and x0
        return (eps_from_x0 if want == "eps" else x0_from_eps)(pred, x_t, t, sched)
    sqrt_abar = sched.gather(sched.sqrt_abar, t, x_t)
    sqrt_one_minus_abar = sched.gather(sched.sqrt_one_minus_abar, t, x_t)
    if want == "eps":
        return sqrt_one_minus_abar * x_t + sqrt_abar * pred
    return sqrt_abar * x_t - sqrt_one_minus_abar * pred


def eps_from_pred(pred: torch.Tensor, x_t: torch.Tensor, t: TimeLike, sched: Schedule,
                  prediction: str = "eps") -> torch.Tensor:
    """The eps implied by a model output of kind `prediction` (eps | v | x0) at x_t.
    v: eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return _from_pred(pred, x_t, t, sched, prediction, "eps")


def x0_from_pred(pred: torch.Tensor, x_t: torch.Tensor, t: TimeLike, sched: Schedule,
                 prediction: str = "eps") -> torch.Tensor:
    """The x_0 implied by a model output of kind `prediction` (eps | v | x0) at x_t.
    v: x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return _from_pred(pred, x_t, t, sched, prediction, "x0")


def score_from_eps(eps: torch.Tensor, t: TimeLike, sched: Schedule) -> torch.Tensor:
    """s_theta(x_t, t) = -eps_theta(x_t, t) / sqrt(1 - abar_t) (lecture: DDPM vs NCSN)."""
    check_schedule(sched)
    t = check_t(sched, t, eps)
    return -eps / sched.gather(sched.sqrt_one_minus_abar, t, eps)


def eps_from_score(score: torch.Tensor, t: TimeLike, sched: Schedule) -> torch.Tensor:
    """eps = -sqrt(1 - abar_t) * score (inverse of `score_from_eps`)."""
    check_schedule(sched)
    t = check_t(sched, t, score)
    return -sched.gather(sched.sqrt_one_minus_abar, t, score) * score


def p_mean_from_eps(eps: torch.Tensor, x_t: torch.Tensor, t: TimeLike, sched: Schedule) -> torch.Tensor:
    """mu_theta(x_t, t) = 1/sqrt(alpha_t) * (x_t - (1 - alpha_t)/sqrt(1 - abar_t) * eps_theta)."""
    check_schedule(sched)
    _check_same_shape(eps=eps, x_t=x_t)
    t = check_t(sched, t, x_t)
    return sched.gather(sched.recip_sqrt_alpha, t, x_t) * (x_t - sched.gather(sched.eps_coef, t, x_t) * eps)


def as_eps_model(model_fn: Callable, sched: Schedule, prediction: str = "eps") -> Callable:
    """Wrap `model_fn(x_t, t) -> pred` (eps | v | x0) as `fn(x_t, t) -> eps` in x_t's dtype."""
    check_schedule(sched)
    _check_prediction(prediction)

    def fn(x, t):
        out = model_fn(x, t)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"model_fn must return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return eps_from_pred(out.to(x.dtype), x, t, sched, prediction)

    return model_fn if prediction == "eps" else fn


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def training_target(sched: Schedule, x0: torch.Tensor, t: TimeLike, eps: torch.Tensor,
                    prediction: str = "eps", *, trusted: bool = False) -> torch.Tensor:
    """What the network regresses: eps, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, or x_0."""
    check_schedule(sched)
    _check_prediction(prediction)
    _check_same_shape(x0=x0, eps=eps)
    if prediction == "eps":
        check_t(sched, t, x0, check_range=not trusted)
        return eps
    if prediction == "x0":
        check_t(sched, t, x0, check_range=not trusted)
        return x0
    return v_from_eps(eps, x0, t, sched, trusted=trusted)


def min_snr_weight(sched: Schedule, t: TimeLike, gamma: float, prediction: str = "eps",
                   like: Optional[torch.Tensor] = None, *, trusted: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), (B,) float32: the x_0-space weight
    min(SNR_t, gamma) expressed for the regressed quantity:
        eps: min(SNR, gamma) / SNR,   v: min(SNR, gamma) / (SNR + 1),   x0: min(SNR, gamma)."""
    check_schedule(sched)
    _check_prediction(prediction)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 here (0 disables it in training_loss), got {gamma}")
    t = check_t(sched, t, like, check_range=not trusted)
    snr = sched.table(sched.snr, torch.float64, t.device)[t]
    clipped = snr.clamp(max=float(gamma))
    w = {"eps": clipped / snr, "v": clipped / (snr + 1.0), "x0": clipped}[prediction]
    return w.float()


def lt_weight(sched: Schedule, t: TimeLike, prediction: str = "eps",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The lecture's weight of L_t in front of the squared error (B,):

        L_t = (1 - alpha_t)^2 / (2 beta_tilde_t alpha_t (1 - abar_t)) * ||eps - eps_theta||^2

    For v / x0 outputs the same L_t in their own error: ||eps - eps_hat||^2 = abar_t ||v - v_hat||^2
    = SNR_t ||x0 - x0_hat||^2, so the weight is multiplied by abar_t or SNR_t.
    The error is a SUM over dims in the lecture; `training_loss` returns a MEAN, so
    training_loss(..., weights=lt_weight(...)) is L_t / D. At t = 1 (beta_tilde_1 = 0, where the
    lecture's term is the decoder) the clipped variance beta_tilde_2 is used, keeping it finite."""
    check_schedule(sched)
    _check_prediction(prediction)
    t = check_t(sched, t)
    bt = sched.log_beta_tilde_clipped.exp()
    w = (1 - sched.alphas) ** 2 / (2 * bt * sched.alphas * (1 - sched.abar))
    w[0] = 0.0
    if prediction == "v":
        w = w * sched.abar
    elif prediction == "x0":
        w = w * sched.snr
    return sched.table(w, torch.float64, t.device)[t].to(dtype)


def training_loss(sched: Schedule, model_out: torch.Tensor, x0: torch.Tensor, t: TimeLike,
                  eps: torch.Tensor, prediction: str = "eps", min_snr_gamma: float = 0.0,
                  weights: Optional[torch.Tensor] = None, *, trusted: bool = False) -> torch.Tensor:
    """Per-sample loss (B,): mean over non-batch dims of (model_out - target)^2 (L_simple for eps),
    times the min-SNR-gamma weight when min_snr_gamma > 0, times `weights` (B,) when given
    (e.g. `lt_weight(sched, t)` for the lecture's weighted L_t).

    x_t = q_sample(sched, x0, t, eps) is what the network saw; model_out = network(x_t, t, ...).
    Computed in float32 (float64 if model_out is float64). Reduce with .mean() in the trainer.
    ``trusted``: t was drawn in range by the caller (the trainer): no host read of t."""
    check_schedule(sched)
    _check_prediction(prediction)
    _check_same_shape(model_out=model_out, x0=x0, eps=eps)
    if min_snr_gamma < 0:
        raise ValueError(f"min_snr_gamma must be >= 0 (0 = off), got {min_snr_gamma}")
    t = check_t(sched, t, x0, check_range=not trusted)
    dtype = torch.float64 if model_out.dtype == torch.float64 else torch.float32
    target = training_target(sched, x0.to(dtype), t, eps.to(dtype), prediction, trusted=True)
    loss = (model_out.to(dtype) - target).pow(2).flatten(1).mean(1)              # (B,)
    if min_snr_gamma > 0:
        loss = loss * min_snr_weight(sched, t, min_snr_gamma, prediction, like=x0, trusted=True).to(dtype)
    if weights is not None:
        weights = torch.as_tensor(weights, device=loss.device)
        if weights.ndim > 1 or (weights.ndim == 1 and weights.shape[0] not in (1, loss.shape[0])):
            raise ValueError(f"weights must be a scalar or shaped ({loss.shape[0]},), got {tuple(weights.shape)}")
        loss = loss * weights.to(dtype)
    return loss


# ---------------------------------------------------------------------------------------------
# The ELBO in bits/dim
# ---------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """log P(x) elementwise for x in [-1, 1] on a grid of `bins` levels (8-bit: 256), under
    N(mean, exp(log_scale)^2) integrated over the bin [x - 1/255, x + 1/255]; the edge bins extend to
    -inf / +inf (as improved-diffusion's discretized_gaussian_log_likelihood, with the exact CDF)."""
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scale)
    lo = (x - mean - half) * inv_std
    hi = (x - mean + half) * inv_std
    log_cdf_hi = torch.special.log_ndtr(hi)                                   # log P(X <= x+)
    log_sf_lo = torch.special.log_ndtr(-lo)                                   # log P(X >= x-)
    # P(lo < Z < hi) computed on the side of the tail where it does not cancel
    delta = torch.where(lo > 0, torch.special.ndtr(-lo) - torch.special.ndtr(-hi),
                        torch.special.ndtr(hi) - torch.special.ndtr(lo))
    log_mid = torch.log(delta.clamp(min=1e-12))
    edge = 1.0 - half / 2
    return torch.where(x < -edge, log_cdf_hi, torch.where(x > edge, log_sf_lo, log_mid))


def randn_like(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


@torch.no_grad()
def elbo(model_fn: Callable, x0: torch.Tensor, sched: Schedule, *,
         generator: Optional[torch.Generator] = None, t_stride: int = 1, prediction: str = "eps",
         return_terms: bool = False, callback: Optional[Callable] = None):
    """The negative ELBO (an upper bound on -log p(x_0)) in bits/dim, per sample (B,):

        -ELBO = L_T + sum_{t=2}^T L_t + L_0
        L_T = KL(q(x_T | x_0) || N(0, I))                                      (no model)
        L_t = E_{q(x_t|x_0)} KL(q(x_{t-1} | x_t, x_0) || N(mu_theta(x_t, t), beta_tilde_t I))
        L_0 = E_{q(x_1|x_0)} -log p(x_0 | x_1), discretized Gaussian, mean mu_theta(x_1, 1),
              variance beta_tilde_2 (the clipped log-variance: beta_tilde_1 = 0)

    each divided by D ln 2 (D = dims per sample). x0 must lie in [-1, 1] (8-bit data scaled).
    Each expectation over x_t uses one draw of eps per sample (as improved-diffusion's calc_bpd_loop);
    every KL is the exact Gaussian KL (computed in float64). With t_stride = 1 all T terms are
    evaluated (exact sum); t_stride = k splits 2..T into strata of k timesteps, evaluates one t drawn
    uniformly in each (from `generator`) and weights it by the stratum size: an unbiased estimate of
    sum_t L_t at 1/k of the cost (the L_t are largest at small t, so a fixed grid would be biased).

    model_fn(x_t, t) -> output of kind `prediction`, t an int64 (B,) tensor. Returns bpd (B,), or
    (bpd, terms) with return_terms: terms = {"prior", "decoder": (B,) bpd, "vb": (B, K) bpd of each
    evaluated L_t (unweighted), "t": (K,) the evaluated t, "weight": (K,) stratum sizes}."""
    check_schedule(sched)
    _check_prediction(prediction)
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        raise ValueError("x0 must be a floating tensor (B, ...) with at least one data dim")
    if x0.numel() and (x0.min() < -1 - 1e-5 or x0.max() > 1 + 1e-5):
        raise ValueError("elbo: x0 must lie in [-1, 1] (8-bit data scaled to [-1, 1])")
    if isinstance(t_stride, bool) or not isinstance(t_stride, int) or t_stride < 1:
        raise ValueError(f"t_stride must be an int >= 1, got {t_stride!r}")
    fn = as_eps_model(model_fn, sched, prediction)
    T, B = sched.T, x0.shape[0]
    D = x0[0].numel()
    to_bpd = 1.0 / (D * math.log(2.0))
    x0d = x0.to(torch.float64)

    def per_sample(v):  # sum over data dims -> (B,)
        return v.flatten(1).sum(1)

    # L_T = KL(N(sqrt(abar_T) x_0, (1 - abar_T) I) || N(0, I))
    a_T = sched.abar[T].item()
    prior = per_sample(normal_kl(math.sqrt(a_T) * x0d, torch.full_like(x0d, math.log1p(-a_T)),
                                 torch.zeros_like(x0d), torch.zeros_like(x0d)))

    def mu_theta(t_int):
        eps = randn_like(x0, generator)
        t = torch.full((B,), t_int, dtype=torch.int64, device=x0.device)
        x_t = q_sample(sched, x0, t, eps)
        eps_hat = fn(x_t, t)
        if not isinstance(eps_hat, torch.Tensor) or eps_hat.shape != x0.shape:
            raise ValueError("model_fn must return a tensor shaped like x")
        return x_t.to(torch.float64), p_mean_from_eps(eps_hat.to(torch.float64), x_t.to(torch.float64), t_int, sched)

    # L_t, t = 2..T (model variance beta_tilde_t, exact Gaussian KL); with t_stride > 1 one t drawn
    # uniformly from each stratum [2 + j k, 2 + (j+1) k) (stratified sampling: unbiased for the sum)
    starts = list(range(2, T + 1, t_stride))
    weights = [min(t_stride, T + 1 - t) for t in starts]
    if t_stride == 1:
        ts = starts
    else:
        u = torch.rand(len(starts), generator=generator,
                       device=generator.device if generator is not None else None).tolist()
        ts = [t0 + min(int(ui * w), w - 1) for t0, w, ui in zip(starts, weights, u)]
    vb = torch.zeros(B, len(ts), dtype=torch.float64, device=x0.device)
    for k, t_int in enumerate(reversed(ts)):
        j = len(ts) - 1 - k
        x_t, mu = mu_theta(t_int)
        mu_tilde, _ = q_posterior(sched, x0d, x_t, t_int)
        logvar = torch.full_like(mu, math.log(sched.beta_tilde[t_int].item()))
        vb[:, j] = per_sample(normal_kl(mu_tilde, logvar, mu, logvar))
        if callback is not None:
            callback({"i": k, "n": len(ts) + 1, "t": t_int})

    # L_0 = -log p(x_0 | x_1): discretized Gaussian decoder
    _, mu1 = mu_theta(1)
    log_scale = torch.full_like(mu1, 0.5 * sched.log_beta_tilde_clipped[1].item())
    decoder = -per_sample(discretized_gaussian_log_likelihood(x0d, mu1, log_scale))
    if callback is not None:
        callback({"i": len(ts), "n": len(ts) + 1, "t": 1})

    w = torch.tensor(weights, dtype=torch.float64, device=x0.device)
    total = (prior + (vb * w).sum(1) + decoder) * to_bpd
    if not return_terms:
        return total
    return total, {"prior": prior * to_bpd, "decoder": decoder * to_bpd, "vb": vb * to_bpd,
                   "t": torch.tensor(ts, dtype=torch.int64), "weight": w}
