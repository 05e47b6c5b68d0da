"""Loss laws L(N, D) = E + A / N^alpha + B / D^beta and their closed-form compute optimum.

N is the total parameter count (Chinchilla's convention), D training tokens. Named laws:
- chinchilla: Hoffmann et al. 2022, Approach 3 (rounded as published).
- epoch: Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", refit of
  Hoffmann et al.'s Figure 4 data.
A law file is JSON with keys E, A, B, alpha, beta (what `scalelab fit --out` writes; other
keys are ignored).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.config import closest
from scalelab.errors import UserError


@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "custom"

    def loss(self, N, D):
        """Predicted loss; N and D may be numpy arrays (broadcast). Terms past float range are inf or 0,
        without numpy's warnings (the planner refuses a law whose losses are not finite)."""
        N = np.asarray(N, dtype=np.float64)
        D = np.asarray(D, dtype=np.float64)
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    @property
    def log_G(self) -> float:
        """ln G, computed from logarithms so that extreme (valid) parameters cannot overflow."""
        return ((math.log(self.alpha) + math.log(self.A) - math.log(self.beta) - math.log(self.B))
                / (self.alpha + self.beta))

    @property
    def G(self) -> float:
        """Hoffmann et al.'s G = (alpha·A / (beta·B))^(1/(alpha+beta))."""
        return _exp(self.log_G)

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a (= beta / (alpha + beta))."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b (= alpha / (alpha + beta))."""
        return self.alpha / (self.alpha + self.beta)

    def optimal_n(self, C):
        """N_opt(C) = G · (C/6)^(beta/(alpha+beta)), the minimiser of loss under C = 6ND."""
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(self.log_G + self.a * np.log(np.asarray(C, dtype=np.float64) / 6.0))

    def optimal_d(self, C):
        """D_opt(C) = (1/G) · (C/6)^(alpha/(alpha+beta))."""
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(self.b * np.log(np.asarray(C, dtype=np.float64) / 6.0) - self.log_G)

    def closed_form(self, C: float) -> dict[str, float]:
        """The 6ND optimum at budget C: N, D, D/N, and the predicted loss. Worked in logarithms, so any
        finite positive parameters give an answer without an exception: N or D is 0.0 or inf only where
        the true value lies outside float range (check with `closed_form_is_a_model`)."""
        log_c6 = math.log(C / 6.0)
        log_n = self.log_G + self.a * log_c6
        log_d = self.b * log_c6 - self.log_G
        loss = self.E + _exp(math.log(self.A) - self.alpha * log_n) + _exp(math.log(self.B) - self.beta * log_d)
        return {"N": _exp(log_n), "D": _exp(log_d), "C": float(C), "tokens_per_param": _exp(log_d - log_n),
                "loss": loss}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exp(x: float) -> float:
    """math.exp that saturates to inf instead of raising OverflowError."""
    return math.exp(x) if x < 709.0 else math.inf


def closed_form_is_a_model(cf: dict[str, float]) -> bool:
    """A closed-form optimum a model can have: at least one parameter and one token, finite loss."""
    return 1.0 <= cf["N"] < math.inf and 1.0 <= cf["D"] < math.inf and math.isfinite(cf["loss"])


LAWS: dict[str, LossLaw] = {
    "chinchilla": LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="chinchilla"),
    "epoch": LossLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="epoch"),
    # Our own fit, for `scalelab demo`'s setup only (Shakespeare, 2048-token BPE, LLaMA-3-style
    # models of 0.4M-5.3M parameters, seq 128, AdamW 3e-3·128/width, 0.25M-1.4M tokens): 15 CPU
    # runs of benchmarks/ladder_shakespeare.py (its first version), 2026-11-28 (docs/fit.md). Poorly determined
    # (bootstrap stderr: E ±1.1, alpha ±0.81, beta ±0.12), but it predicted the val loss of a
    # shape the ladder never ran (3L×128H on 1.52M tokens, C = 1e13) to +0.019 nats.
    "shakespeare-cpu": LossLaw(E=2.68405, A=590343.1, B=74.87883, alpha=1.125575, beta=0.2748871,
                               name="shakespeare-cpu"),
}


def get_law(name: str) -> LossLaw:
    try:
        return LAWS[name.lower()]
    except KeyError:
        raise UserError(f"unknown law '{name}'{closest(name.lower(), LAWS)}; choose from "
                        f"{', '.join(LAWS)}, or give --law-file FILE or --E --A --B --alpha --beta") from None


def law_from_values(values: dict[str, Any], *, where: str = "law") -> LossLaw:
    """Validate E, A, B, alpha, beta: finite numbers; A, B, alpha, beta > 0, E >= 0."""
    out = {}
    for key in ("E", "A", "B", "alpha", "beta"):
        if key not in values:
            raise UserError(f"{where}: missing '{key}' (a law needs E, A, B, alpha, beta)")
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: '{key}' must be a finite number, got {v!r}")
        if key == "E" and v < 0 or key != "E" and v <= 0:
            raise UserError(f"{where}: '{key}' must be {'non-negative' if key == 'E' else 'positive'}, got {v}")
        out[key] = float(v)
    return LossLaw(**out, name=str(values.get("name", "custom")))


def read_law_json(path: str | Path) -> dict:
    """A law file's JSON object (the loss law's E, A, B, alpha, beta; `fit` may add "hyperparameters"),
    or a one-line UserError naming what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"law file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a law file is a JSON object with E, A, B, alpha, beta")
    return data


def load_law_file(path: str | Path) -> LossLaw:
    return law_from_values(read_law_json(path), where=str(path))


def save_law(law: LossLaw, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    from scalelab.files import atomic_write_text

    data = law.to_dict()
    data.update(extra or {})
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
