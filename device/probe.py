"""A linear probe on the shipped features: standardisation + multinomial logistic regression with L2.

The baseline the adaptor must beat, trained on the device on the very bytes the adaptor gets:

    f = features(x)                 "pooled": the mean over tokens of each of the k maps   (k*d values)
                                     "flat":   every token of every map, flattened           (k*T*d values)
    z = (f - mean) * inv_std        standardisation with the training set's statistics
    logits = z @ weight + bias
    loss = mean cross-entropy + l2 / 2 * |weight|^2

Solver: full batch, L-BFGS with a backtracking (Armijo) line search, from zero weights. The problem is convex,
so the optimum does not depend on a seed, and L-BFGS reaches it in a few hundred cheap iterations on the
VTAB-1k scale (a thousand rows, even flattened: 800 x 9,408 fp32 is 30 MB). The features must fit in memory
as float32; ``fit_memory_bytes`` says how much, and the trainer refuses a set that does not fit.

The module is the probe's model kind (``KIND``, registered in device/kinds.py): it is fitted once, before an
adaptor's first epoch, by ``fit_family`` on features read once for every L2 strength.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import Checkpoint, FormatError

from .layers import softmax_cross_entropy
from .model_kind import ModelKind
from .record import check_record

FEATURES = ("pooled", "flat")


@dataclass
class ProbeConfig:
    dim: int
    tokens: int
    groups: int
    num_classes: int
    features: str = "pooled"
    l2: float = 1e-2
    input_scale: float = 1.0
    max_iter: int = 300

    def validate(self) -> None:
        for name in ("dim", "tokens", "groups", "num_classes", "max_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ProbeConfig.{name} must be an integer >= 1, got {value!r}")
        if self.features not in FEATURES:
            raise ValueError(f"ProbeConfig.features must be one of {FEATURES}, got {self.features!r}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"ProbeConfig.l2 must be finite and >= 0, got {self.l2!r}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"ProbeConfig.input_scale must be finite and > 0, got {self.input_scale!r}")

    @property
    def width(self) -> int:
        return self.groups * self.dim * (1 if self.features == "pooled" else self.tokens)

    def shipped_values(self) -> int:
        """Values per image that must cross to the device: a pooled probe needs only the pooled vectors."""
        return self.width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProbeConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ProbeConfig keys: {sorted(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


def probe_features(x: np.ndarray, features: str, input_scale: float = 1.0) -> np.ndarray:
    """(B, k, T, d) shipped maps -> (B, width) float32 probe inputs."""
    x = np.asarray(x, dtype=np.float32)
    if input_scale != 1.0:
        x = x * np.float32(input_scale)
    if features == "pooled":
        return x.mean(axis=2).reshape(len(x), -1)
    return x.reshape(len(x), -1)


def fit_memory_bytes(rows: int, cfg: ProbeConfig, history: int = 10) -> int:
    """Bytes the full-batch fit holds: the standardised features (fp32), one logits-sized buffer per pass,
    and L-BFGS's history of (weight-sized) steps and gradient changes in float64."""
    weights = (cfg.width + 1) * cfg.num_classes
    return rows * cfg.width * 4 + 4 * rows * cfg.num_classes * 8 + (2 * history + 4) * weights * 8


def loss_and_grad(weight: np.ndarray, bias: np.ndarray, z: np.ndarray, labels: np.ndarray,
                  l2: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy + l2/2 |W|^2 on standardised inputs z; its gradient in W and b.

    d/dlogits of the mean cross-entropy is (softmax - onehot) / N; the logits are z @ W + b, so
    dW = z^T dlogits + l2 W and db = sum over rows of dlogits.
    """
    n = len(z)
    logits = z @ weight.astype(z.dtype) + bias.astype(z.dtype)
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -logp[np.arange(n), labels].mean() + 0.5 * l2 * float(np.sum(weight * weight))
    dlogits = np.exp(logp)
    dlogits[np.arange(n), labels] -= 1.0
    dlogits /= n
    dweight = (z.T @ dlogits.astype(z.dtype)).astype(np.float64) + l2 * weight
    dbias = dlogits.sum(axis=0)
    return float(loss), dweight, dbias


def lbfgs(fun, w0: np.ndarray, max_iter: int, history: int = 10, tol: float = 1e-6) -> tuple[np.ndarray, int]:
    """Minimise a smooth function f(w) -> (value, gradient) from w0; returns (w, iterations used)."""
    w = w0.copy()
    f, g = fun(w)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for it in range(max_iter):
        if np.max(np.abs(g)) < tol:
            return w, it
        # two-loop recursion: direction = -H g, H the L-BFGS inverse-Hessian estimate
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(s_hist), reversed(y_hist)):
            a = float(s @ q) / float(y @ s)
            alphas.append(a)
            q -= a * y
        if s_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        for (s, y), a in zip(zip(s_hist, y_hist), reversed(alphas)):
            q += (a - float(y @ q) / float(y @ s)) * s
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
            s_hist, y_hist, direction, slope = [], [], -g, -float(g @ g)
        step = 1.0 if s_hist else 1.0 / max(1.0, float(np.linalg.norm(g)))
        for _ in range(30):
            w_new = w + step * direction
            f_new, g_new = fun(w_new)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            return w, it  # no decrease possible at this precision: converged
        s, y = w_new - w, g_new - g
        if float(s @ y) > 1e-12:
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > history:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(f - f_new) <= 1e-10 * max(1.0, abs(f))
        w, f, g = w_new, f_new, g_new
        if converged:
            return w, it + 1
    return w, max_iter


class Probe:
    """Same surface as the LAE for evaluation: ``cfg``, ``params``, ``dtype``, ``reads``, ``forward``."""

    kind = "probe"
    reads = "features"  # the (B, k, T, d) maps of a data.Batch, unscaled: the probe scales and pools them

    def __init__(self, cfg: ProbeConfig, params: dict[str, np.ndarray]):
        cfg.validate()
        F, C = cfg.width, cfg.num_classes
        shapes = {"mean": (F,), "inv_std": (F,), "weight": (F, C), "bias": (C,)}
        if set(params) != set(shapes):
            raise ValueError(f"probe params must be {sorted(shapes)}, got {sorted(params)}")
        for name, shape in shapes.items():
            if params[name].shape != shape:
                raise ValueError(f"probe param {name} has shape {params[name].shape}, expected {shape}")
        self.cfg, self.params = cfg, {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        self.dtype = np.dtype(np.float32)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        f = probe_features(x, self.cfg.features, self.cfg.input_scale)
        return (f - self.params["mean"]) * self.params["inv_std"]

    def forward(self, x: np.ndarray, keep_cache: bool = False) -> np.ndarray:
        """x (B, k, T, d) -> logits (B, C). Nothing is cached: the probe is fitted by ``fit_probe``, not by steps."""
        cfg = self.cfg
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (cfg.groups, cfg.tokens, cfg.dim):
            raise ValueError(f"features must have shape {('B', cfg.groups, cfg.tokens, cfg.dim)}, got {x.shape}")
        return self.standardise(x) @ self.params["weight"] + self.params["bias"]


def standardisation(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and 1/std of the training features (float64 sums); constant features get 1/std = 0
    would lose nothing, but 1 keeps them harmless and finite."""
    mean = f.mean(axis=0, dtype=np.float64)
    var = f.var(axis=0, dtype=np.float64)
    inv_std = np.where(var > 1e-12, 1.0 / np.sqrt(np.maximum(var, 1e-12)), 1.0)
    return mean.astype(np.float32), inv_std.astype(np.float32)


def fit_probe(cfg: ProbeConfig, f_train: np.ndarray, labels: np.ndarray,
              stats: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Probe, dict]:
    """Fit on (N, width) probe features (``probe_features``) and labels; returns the probe and a fit report.

    ``stats`` (mean, inv_std) lets several L2 values share one standardisation.
    """
    cfg.validate()
    mean, inv_std = stats if stats is not None else standardisation(f_train)
    z = (f_train - mean) * inv_std
    F, C = cfg.width, cfg.num_classes
    labels = np.asarray(labels, dtype=np.int64)

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = w[:F * C].reshape(F, C), w[F * C:]
        loss, dweight, dbias = loss_and_grad(weight, bias, z, labels, cfg.l2)
        return loss, np.concatenate([dweight.ravel(), dbias])

    w, iterations = lbfgs(fun, np.zeros(F * C + C), cfg.max_iter)
    loss, _ = fun(w)
    params = {"mean": mean, "inv_std": inv_std, "weight": w[:F * C].reshape(F, C), "bias": w[F * C:]}
    return Probe(cfg, params), {"train_loss": loss, "iterations": iterations}


# A search's L2 strengths: nine, a decade apart, as scikit-learn users search C over 1e-4..1e4. The two are the
# same objective scaled: C * sum(CE) + |w|^2 / 2 is N * C times mean(CE) + l2 / 2 * |w|^2 with l2 = 1 / (N * C),
# so at N of a few hundred to a few thousand rows this range covers theirs (refit.py keeps C, not l2, fixed).
L2_VALUES = tuple(10.0 ** e for e in range(-6, 3))


def candidates(base: Any, options: dict[str, Any]) -> list[tuple[str, ProbeConfig, dict[str, Any]]]:
    """A search's probes: every L2 strength on the pooled maps, the flattened maps, or both
    (``options["probe_features"]``); ``base`` is an adaptor config, for the set's sizes."""
    chosen = options.get("probe_features", "both")
    features = FEATURES if chosen == "both" else (chosen,)
    cfgs = [ProbeConfig(dim=base.dim, tokens=base.tokens, groups=base.groups, num_classes=base.num_classes,
                        features=f, l2=l2, input_scale=base.input_scale) for f in features for l2 in L2_VALUES]
    return [(probe_name(c), c, {}) for c in cfgs]


def probe_name(cfg: ProbeConfig) -> str:
    return f"probe-{cfg.features}-l2-{cfg.l2:g}"


def fit_family(cfgs: list[ProbeConfig], x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None,
               y_val: np.ndarray, log: Callable[[str], None] = print) -> list[tuple[str, Probe, dict[str, Any]]]:
    """Fit every config on features read once: probes of one feature kind share the features and their
    standardisation. Each report holds the fit's train loss, iterations, seconds and (with validation rows)
    val_acc and val_loss."""
    fitted = []
    for features in FEATURES:
        family = [c for c in cfgs if c.features == features]
        if not family:
            continue
        f_train = probe_features(x_train, features, family[0].input_scale)
        stats = standardisation(f_train)
        f_val = probe_features(x_val, features, family[0].input_scale) if x_val is not None else None
        for cfg in family:
            start = time.perf_counter()
            probe, report = fit_probe(cfg, f_train, y_train, stats)
            if f_val is not None:
                logits = (f_val - probe.params["mean"]) * probe.params["inv_std"] @ probe.params["weight"]
                logits = logits + probe.params["bias"]
                loss, _ = softmax_cross_entropy(logits.astype(np.float64), y_val)
                report.update(val_acc=float(np.mean(logits.argmax(1) == y_val)), val_loss=float(loss))
            report["seconds"] = time.perf_counter() - start
            name = probe_name(cfg)
            fitted.append((name, probe, report))
            log(f"{name}: {report['iterations']} L-BFGS iterations, val_acc "
                f"{report.get('val_acc', float('nan')):.3f} ({report['seconds']:.1f}s)")
    return fitted


# ---- the kind ---------------------------------------------------------------------------------------------


def from_checkpoint(ckpt: Checkpoint, path: str | Path) -> Probe:
    where = str(path)
    try:
        cfg = ProbeConfig.from_dict(ckpt.config)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: checkpoint config or weights do not form a probe ({e})") from None
    weight = ckpt.params.get("weight")
    outputs = weight.shape[-1] if weight is not None and weight.ndim == 2 else None
    check_record(ckpt, where, cfg.num_classes, outputs, (cfg.dim, cfg.tokens, cfg.groups))
    try:
        return Probe(cfg, {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: checkpoint config or weights do not form a probe ({e})") from None


def parameter_count(cfg: ProbeConfig) -> int:
    return cfg.width * cfg.num_classes + cfg.num_classes


def inference_bytes(cfg: ProbeConfig, batch: int) -> int:
    """Weights and statistics once, one chunk's probe features and logits."""
    return 4 * (parameter_count(cfg) + 2 * cfg.width + batch * (cfg.width + cfg.num_classes))


def describe(cfg: ProbeConfig) -> str:
    return f"probe ({cfg.features}, l2={cfg.l2:g})"


def memory_bytes(cfg: ProbeConfig, rows: int, keeps_best: bool = False) -> tuple[int, int]:
    """(0, bytes the fit of one probe family needs on ``rows`` rows): a fit's arrays go when it ends."""
    return 0, fit_memory_bytes(rows, cfg)


KIND = ModelKind(name="probe", trains="fit", config=ProbeConfig, build=Probe, from_checkpoint=from_checkpoint,
                 memory_bytes=memory_bytes, inference_bytes=inference_bytes,
                 shipped_values=lambda cfg: cfg.shipped_values(), describe=describe,
                 parameter_count=parameter_count, reads=lambda cfg: Probe.reads, candidates=candidates,
                 fit=fit_family)
