"""Backward N-D grid search: the model shape and token count that minimise predicted loss at a
fixed training compute C.

"Backward" because we start from the budget: for every shape in the space (n_embd × n_layer ×
head_dim × KV heads) the token count is solved exactly from C with the shape's exact training
FLOPs per token at the training sequence length, D = C / training_flops_per_token(shape, S)
(counting.py's convention, the one FlopCounterMode measures), so every candidate spends exactly
C. The loss law then scores each (N, D) and the lowest wins. Everything is one numpy pass over
all shapes; parameters, FLOPs and memory come from counting.py's `*_arrays` functions, never
from formulas of our own.

No torch here (`scalelab plan` starts instantly).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scalelab import counting
from scalelab.config import FLOAT_LIMITS, INT_LIMITS, derive_d_ff
from scalelab.errors import UserError
from scalelab.hardware import Accelerator
from scalelab.presets import STYLES, style_config
from scalelab.scaling.laws import LossLaw, closed_form_is_a_model

# Aspect ratio n_embd / n_layer of well-trained models (official configs):
#   GPT-3 350M 43, 1.3B 85, 2.7B 80, 6.7B 128, 175B 128; Chinchilla 70B 102; LLaMA-2 7B/13B 128,
#   70B 102; LLaMA-3 8B 128, 70B 102, 405B 130; LLaMA-3.2 1B 128, 3B 110; Mistral 7B 128.
# Kaplan et al. 2020 (Fig. 5) found loss at fixed N within a few percent for aspect ratios from
# about 20 to 200, so the law (which sees only N and D) is blind to shape inside that band -- and
# because exact FLOPs per token fall as a model gets wider and shallower (less attention, more
# free embedding parameters), an unguarded search always runs to the widest shape allowed. The
# default therefore spans the models above: 40 (GPT-3 350M) to 130 (LLaMA-3.1-405B, the widest
# LLaMA); the upper bound is the one that binds. Gopher (205) went wider and was not repeated.
ASPECT_DEFAULT = (40.0, 130.0)
MAX_SHAPES = 20_000_000  # ~200 bytes of arrays per shape: beyond this, ask for a coarser step
# The default widths and depths (GPT-3 350M to LLaMA-3-70B sizes). When the user gives no --hidden or
# --layers, search() grows these ranges (doubling the maximum, halving the minimum, same step) for as
# long as a shape past their edges would beat the plan, up to MAX_GROWN_SHAPES: a 1e25 budget is not
# held to 57B parameters by a default chosen for 1e21.
DEFAULT_HIDDEN = tuple(range(1024, 8192 + 1, 256))
DEFAULT_LAYERS = tuple(range(16, 64 + 1, 2))
MAX_GROWN_SHAPES = 2_000_000
PROBE_STEPS = 4  # how far past an edge (in the range's steps) the binding probe looks

_EMPTY = np.zeros(0, dtype=np.int64)
# counting's precision -> the training config's train.dtype that runs it (trainer.predicted_memory's map)
TRAINER_DTYPE = {"bf16-mixed": "bf16", "fp32": "fp32"}


@dataclass(frozen=True)
class SearchSpace:
    """What the planner may choose from, and the real-world limits on it.

    None means "the style's default" for kv_heads, ffn_ratio and vocab_size. kv_heads is a tuple
    of KV-head counts to try; `mha=True` ties KV heads to the query heads (no GQA).
    """

    hidden: tuple[int, ...] | None = None  # None: DEFAULT_HIDDEN, grown with the budget while it binds
    layers: tuple[int, ...] | None = None  # None: DEFAULT_LAYERS, likewise
    head_dims: tuple[int, ...] = (64, 128)
    kv_heads: tuple[int, ...] | None = None
    mha: bool = False
    style: str = "llama3"
    ffn_ratio: float | None = None
    seq_len: int = 2048
    vocab_size: int | None = None
    aspect: tuple[float, float] | None = ASPECT_DEFAULT
    max_tokens: float | None = None
    max_params: float | None = None
    enforce_chinchilla: bool = False
    tokens_per_param: float = 20.0
    tolerance: float = 0.5
    gpus: int = 1
    accelerator: Accelerator | None = None  # given: drop shapes whose training state does not fit
    mfu: float = 0.4
    # Memory model for the fit filter: the least memory the trainer can be set up to use, so a
    # shape is dropped only when it cannot train at all on this hardware. `trainer_settings` spells
    # these (and the sharding) as the training config's keys; the emitted config carries them.
    micro_batch: int = 1
    activation_checkpointing: bool = True
    precision: str = "bf16-mixed"
    attention: str = "sdpa"
    # given (`plan --layout auto`): the filter keeps a shape when any layout the layout search
    # considers fits it (layout_search.fits_any, with these checkpointing modes), not only FSDP over
    # every GPU: a cheap floor over all shapes first (layout_memory_floor), then the real check on
    # the best survivors in loss order (keep_shapes_a_layout_fits)
    layout_checkpointing: tuple[tuple[str, str], ...] | None = None
    # micro-batches per optimizer step: from the second on, the gradients accumulated so far are live
    # through forward and backward (counting.accumulated_gradient_bytes; the same for any k > 1)
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            style_config(self.style, 1, 64, 1)  # raises the standard unknown-style UserError
        for name in ("hidden", "layers", "head_dims"):
            values = getattr(self, name)
            if values is None and name != "head_dims":
                continue  # the default, grown with the budget by search()
            if not values:
                raise UserError(f"--{name.replace('_', '-')} is empty; give at least one value")
            if min(values) <= 0:
                raise UserError(f"--{name.replace('_', '-')} values must be positive, got {min(values)}")
        if self.kv_heads is not None and (not self.kv_heads or min(self.kv_heads) <= 0):
            raise UserError("--kv-heads must be positive integers, e.g. --kv-heads 8")
        if self.seq_len <= 0:
            raise UserError(f"--seq-len must be positive, got {self.seq_len}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise UserError(f"--vocab must be positive, got {self.vocab_size}")
        if self.ffn_ratio is not None and not self.ffn_ratio > 0:
            raise UserError(f"--ffn-ratio must be positive, got {self.ffn_ratio}")
        # the bounds every ModelConfig obeys (config.INT_LIMITS), so the int64 counts cannot overflow
        for flag, values, name in (("--hidden", self.hidden, "n_embd"), ("--layers", self.layers, "n_layer"),
                                    ("--head-dims", self.head_dims, "n_embd"),
                                    ("--kv-heads", self.kv_heads, "num_key_value_heads"),
                                    ("--seq-len", (self.seq_len,), "block_size"),
                                    ("--vocab", (self.vocab_size,) if self.vocab_size else None, "vocab_size")):
            if values and max(values) > INT_LIMITS[name]:
                raise UserError(f"{flag} values must be at most {INT_LIMITS[name]:,} (the {name} limit), "
                                f"got {max(values):.3g}")
        if self.ffn_ratio is not None and not self.ffn_ratio <= FLOAT_LIMITS["ffn_expansion_ratio"]:
            raise UserError(f"--ffn-ratio must be at most {FLOAT_LIMITS['ffn_expansion_ratio']:g}, got {self.ffn_ratio:g}")
        widest = max(self.hidden or DEFAULT_HIDDEN)
        if derive_d_ff(widest, self.ratio, self.multiple_of) > INT_LIMITS["d_ff"]:
            raise UserError(f"--ffn-ratio {self.ratio:g} x n_embd {widest} exceeds the d_ff limit "
                            f"{INT_LIMITS['d_ff']:,}; lower --ffn-ratio or --hidden")
        if self.aspect is not None and not 0 < self.aspect[0] <= self.aspect[1]:
            raise UserError(f"--aspect MIN:MAX needs 0 < MIN <= MAX, got {self.aspect[0]:g}:{self.aspect[1]:g}")
        if self.position_encoding == "rope" and any(d % 2 for d in self.head_dims):
            raise UserError(f"RoPE needs even head dims, got --head-dims {','.join(map(str, self.head_dims))}")
        if not 0 < self.tokens_per_param < math.inf or not 0 <= self.tolerance < math.inf:
            raise UserError("--tokens-per-param must be positive and --tolerance non-negative, both finite")
        if self.gpus <= 0:
            raise UserError(f"--gpus must be positive, got {self.gpus}")

    @property
    def sharding(self) -> str:
        """FSDP over several GPUs (torchrun); one GPU trains unsharded (plain `scalelab train`)."""
        return "fsdp" if self.gpus > 1 else "none"

    def trainer_settings(self) -> dict[str, dict[str, Any]]:
        """The memory filter's assumptions as training-config sections: with them, the trainer's own
        prediction (counting.training_memory of the config) is the plan's memory figure. Empty without
        hardware (no memory figure, nothing assumed)."""
        if self.accelerator is None:
            return {}
        return {"train": {"micro_batch_size": self.micro_batch,
                          "activation_checkpointing": self.activation_checkpointing,
                          "dtype": TRAINER_DTYPE[self.precision], "attention": self.attention},
                "parallel": {"strategy": self.sharding}}

    # ---- the style's choices, with this space's overrides --------------------------------
    @property
    def style_fields(self) -> dict[str, Any]:
        return STYLES[self.style]

    @property
    def position_encoding(self) -> str:
        return self.style_fields["position_encoding"]

    @property
    def vocab(self) -> int:
        return self.vocab_size if self.vocab_size is not None else self.style_fields["vocab_size"]

    @property
    def ratio(self) -> float:
        if self.ffn_ratio is not None:
            return self.ffn_ratio
        return self.style_fields.get("ffn_expansion_ratio") or (4.0 if self.style_fields["ffn_type"] == "gelu"
                                                                else 8 / 3)

    @property
    def multiple_of(self) -> int:
        return self.style_fields.get("multiple_of", 1)

    @property
    def kv_choices(self) -> tuple[int, ...] | None:
        """KV-head counts to try; None = MHA (as many KV heads as query heads)."""
        if self.mha:
            return None
        if self.kv_heads is not None:
            return tuple(sorted(set(self.kv_heads)))
        kv = self.style_fields.get("num_key_value_heads")
        return (kv,) if kv else None

    def count_kwargs(self) -> dict[str, Any]:
        """Keywords for counting.param_breakdown_arrays: everything but the size."""
        f = self.style_fields
        return dict(ffn_type=f["ffn_type"], normalization=f["normalization"], bias=f["bias"],
                    tie_embeddings=f["tie_embeddings"],
                    learned_positions=self.seq_len if f["position_encoding"] == "learned" else 0,
                    final_norm=f["norm_position"] == "pre")

    @property
    def n_shapes(self) -> int:
        kv = self.kv_choices
        hidden, layers = self.hidden or DEFAULT_HIDDEN, self.layers or DEFAULT_LAYERS
        return len(set(hidden)) * len(set(layers)) * len(set(self.head_dims)) * (len(kv) if kv else 1)

    def model_config(self, n_layer: int, n_embd: int, n_head: int, kv: int):
        """The ModelConfig of one shape (d_ff explicit so a config file carries the exact width)."""
        d_ff = derive_d_ff(n_embd, self.ratio, self.multiple_of)
        return style_config(self.style, int(n_layer), int(n_embd), int(n_head), num_key_value_heads=int(kv),
                            d_ff=d_ff, ffn_expansion_ratio=None, vocab_size=self.vocab, block_size=self.seq_len)

    def describe(self) -> dict[str, Any]:
        kv = self.kv_choices
        return {
            "style": self.style, "hidden": _range_text(self.hidden), "layers": _range_text(self.layers),
            "head_dims": list(self.head_dims), "kv_heads": list(kv) if kv else "MHA",
            "ffn_ratio": self.ratio, "multiple_of": self.multiple_of, "seq_len": self.seq_len,
            "vocab_size": self.vocab, "aspect": list(self.aspect) if self.aspect else None,
            "max_tokens": self.max_tokens, "max_params": self.max_params,
            "enforce_chinchilla": self.enforce_chinchilla, "tokens_per_param": self.tokens_per_param,
            "tolerance": self.tolerance,
            "hardware": (None if self.accelerator is None else
                         {"gpus": self.gpus, "gpu_type": self.accelerator.name, "mfu": self.mfu,
                          "memory_model": {"micro_batch": self.micro_batch, "sharding": self.sharding,
                                           "precision": self.precision, "attention": self.attention,
                                           "activation_checkpointing": self.activation_checkpointing,
                                           "any_layout": self.layout_checkpointing is not None,
                                           "grad_accum_steps": self.grad_accum_steps}}),
        }


def _range_text(values: tuple[int, ...]) -> str:
    v = sorted(set(values))
    if len(v) > 2:
        steps = set(np.diff(v).tolist())
        if len(steps) == 1:
            return f"{v[0]}:{v[-1]}:{steps.pop()}"
    return ",".join(map(str, v))


# ---- the search -------------------------------------------------------------------------------


def enumerate_shapes(space: SearchSpace) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """All valid shapes, in the order of nested loops over (hidden, layers, head_dim, kv).

    Head rule: n_head = n_embd / head_dim must be a whole number, and the KV-head count must
    divide n_head (GQA groups are equal). Shapes breaking either are skipped and counted.
    """
    hidden = np.array(sorted(set(space.hidden)), dtype=np.int64)
    layers = np.array(sorted(set(space.layers)), dtype=np.int64)
    head_dims = np.array(sorted(set(space.head_dims)), dtype=np.int64)
    kv_choices = space.kv_choices
    kv_axis = np.array(kv_choices if kv_choices else [0], dtype=np.int64)  # 0 = MHA placeholder
    H, L, HD, KV = (a.ravel() for a in np.meshgrid(hidden, layers, head_dims, kv_axis, indexing="ij"))
    head_ok = H % HD == 0
    n_head = H // HD
    KV = np.where(KV == 0, n_head, KV)
    kv_ok = head_ok & (n_head % np.maximum(KV, 1) == 0) & (KV <= n_head)
    skipped = {"head_dim_does_not_divide_n_embd": int((~head_ok).sum()),
               "kv_heads_do_not_divide_n_head": int((head_ok & ~kv_ok).sum())}
    keep = kv_ok
    shapes = {"n_layer": L[keep], "n_embd": H[keep], "n_head": n_head[keep], "num_key_value_heads": KV[keep],
              "head_dim": HD[keep]}
    # d_ff by the style's rule (derive_d_ff), once per distinct width
    uniq, inverse = np.unique(shapes["n_embd"], return_inverse=True)
    d_ff = np.array([derive_d_ff(int(h), space.ratio, space.multiple_of) for h in uniq], dtype=np.int64)
    shapes["d_ff"] = d_ff[inverse] if len(uniq) else _EMPTY
    return shapes, skipped


@dataclass
class PlanResult:
    C: float
    law: LossLaw
    space: SearchSpace
    best: dict[str, Any]
    top: list[dict[str, Any]]
    closed_form: dict[str, Any]
    search: dict[str, Any]
    curve: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # feasible N, loss (for the plot)

    def to_json(self) -> dict[str, Any]:
        return {"best": self.best, "top": self.top, "closed_form": self.closed_form, "search": self.search}


def evaluate(shapes: dict[str, np.ndarray], space: SearchSpace, C: float, law: LossLaw) -> dict[str, np.ndarray]:
    """N, FLOPs per token, D, loss, and each constraint's mask, for every shape at budget C.
    A bound's budget past float range is inf, which compares as it should: no warning for it."""
    with np.errstate(over="ignore"):
        return _evaluate(shapes, space, C, law)


def _evaluate(shapes: dict[str, np.ndarray], space: SearchSpace, C: float, law: LossLaw) -> dict[str, np.ndarray]:
    size = (shapes["n_layer"], shapes["n_embd"], shapes["n_head"], shapes["num_key_value_heads"],
            shapes["d_ff"], space.vocab)
    kw = space.count_kwargs()
    params = counting.param_breakdown_arrays(*size, **kw)
    N = params["total"].astype(np.float64)
    fpt = counting.training_flops_per_token_arrays(*size, space.seq_len, ffn_type=kw["ffn_type"])
    D = C / fpt
    out = {"N": N, "N_non_embedding": params["non_embedding"].astype(np.float64), "fpt": fpt, "D": D,
           "loss": law.loss(N, D)}
    # token bounds per shape: at least one whole sequence, at most the dataset, inside the band
    d_lo = np.full_like(N, float(space.seq_len))
    d_hi = np.full_like(N, np.inf)
    if space.max_tokens is not None:
        d_hi = np.minimum(d_hi, space.max_tokens)
    if space.enforce_chinchilla:
        d_lo = np.maximum(d_lo, space.tokens_per_param * (1 - space.tolerance) * N)
        d_hi = np.minimum(d_hi, space.tokens_per_param * (1 + space.tolerance) * N)
    out["d_lo"], out["d_hi"] = d_lo, d_hi
    # The budget-dependent masks compare C with each bound's budget fpt·bound (not D = C/fpt with the
    # bound): _explain_infeasible uses the same products, so a shape that passes them all is exactly
    # one whose budget interval [fpt·d_lo, fpt·d_hi] holds C, with no rounding between the two.
    masks = {"one_sequence": fpt * space.seq_len <= C}
    aspect = shapes["n_embd"] / shapes["n_layer"]
    if space.aspect is not None:
        masks["aspect"] = (aspect >= space.aspect[0]) & (aspect <= space.aspect[1])
    if space.max_params is not None:
        masks["max_params"] = N <= space.max_params
    if space.max_tokens is not None:
        masks["max_tokens"] = C <= fpt * space.max_tokens
    if space.enforce_chinchilla:
        masks["chinchilla"] = ((fpt * (space.tokens_per_param * (1 - space.tolerance) * N) <= C)
                               & (C <= fpt * (space.tokens_per_param * (1 + space.tolerance) * N)))
    if space.accelerator is not None:
        if space.layout_checkpointing is None:
            mem = counting.training_memory_arrays(
                *size, seq_len=space.seq_len, micro_batch=space.micro_batch, num_devices=space.gpus,
                sharding=space.sharding, precision=space.precision, attention=space.attention,
                activation_checkpointing=space.activation_checkpointing, grad_accum_steps=space.grad_accum_steps,
                **kw)["total"]
        else:
            mem = layout_memory_floor(N, space.precision, space.gpus)
        out["memory"] = mem
        masks["memory"] = mem <= space.accelerator.memory_bytes
    out["masks"] = masks
    return out


def layout_memory_floor(params, precision: str, gpus: int):
    """Bytes per device that no layout of `gpus` devices can go below (numpy arrays of parameter
    counts welcome): weights, gradients and optimizer state (counting.PRECISIONS) spread evenly over
    every device, with nothing else, plus the runtime reserve of that peak. Every layout's busiest
    rank holds at least that share at its optimizer step (tp, pp and FSDP together divide the
    parameters over at most `gpus` devices; replicas, padding and replicated norms only add)."""
    peak = np.asarray(params, dtype=np.float64) * sum(counting.PRECISIONS[precision]) / gpus
    return peak + counting.runtime_reserve_bytes(peak, "cuda")


def layout_global_batch(gpus: int, seq_len: int) -> int:
    """The global batch the layout search assumes: about 0.5M tokens (2**19), in whole micro-batches of
    one sequence per GPU, at least one."""
    per_micro = gpus * seq_len
    return max(1, round(2**19 / per_micro)) * per_micro


def keep_shapes_a_layout_fits(shapes: dict[str, np.ndarray], ev: dict[str, Any], space: SearchSpace,
                              feasible: np.ndarray, top: int) -> None:
    """With space.layout_checkpointing: walk the feasible shapes (those past layout_memory_floor) in
    the order the plan ranks them, asking layout_search.fits_any of each, until `top` fit; each that
    fails no layout leaves the memory mask and `feasible` (both updated in place). The shapes ranked
    below the `top` kept are checked against the floor only."""
    from scalelab import layout_search

    idx = np.flatnonzero(feasible)
    kept = 0
    for i in idx[np.lexsort((idx, ev["loss"][idx]))]:  # by loss, ties by enumeration order (as the ranking)
        cfg = space.model_config(shapes["n_layer"][i], shapes["n_embd"][i], shapes["n_head"][i],
                                 shapes["num_key_value_heads"][i])
        if layout_search.fits_any(cfg, space.accelerator, space.gpus, seq_len=space.seq_len,
                                  global_batch_tokens=layout_global_batch(space.gpus, space.seq_len),
                                  precision=space.precision, attention=space.attention,
                                  checkpointing=space.layout_checkpointing):
            kept += 1
            if kept == top:
                return
        else:
            ev["masks"]["memory"][i] = feasible[i] = False


# constraints a user can relax, and the flag that does it
RELAX_FLAG = {
    "aspect": "--aspect MIN:MAX",
    "max_params": "--max-params",
    "max_tokens": "--max-tokens",
    "chinchilla": "--tolerance (or drop --enforce-chinchilla)",
    "memory": "--gpus / --gpu-type (more or larger GPUs)",
}
BUDGET_DEPENDENT = ("one_sequence", "max_tokens", "chinchilla")


def search(C: float, law: LossLaw, space: SearchSpace | None = None, top: int = 10) -> PlanResult:
    """The backward grid search. Raises UserError when no shape in the space can spend C.

    --hidden / --layers left to the default (None) grow with the budget: while a shape past the
    edge of either range would beat the plan (the binding probe), that range is extended and the
    search rerun. Ranges the user gave are never changed; a binding one is named in the warnings."""
    t0 = time.perf_counter()
    space = space or SearchSpace()
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise UserError(f"the compute budget C must be a positive number of FLOPs, got {C}")
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    check_law_at(law, C)
    growable = {"hidden": space.hidden is None, "layers": space.layers is None}
    space = dataclasses.replace(space, hidden=space.hidden or DEFAULT_HIDDEN, layers=space.layers or DEFAULT_LAYERS)
    default = space
    while True:
        result = _search_space(C, law, space, top)
        grown = _grow(space, result.search["binding"], growable)
        if grown is None:
            break
        space = grown
    if space != default:
        result.search["grown"] = {axis: {"from": _range_text(getattr(default, axis)),
                                         "to": _range_text(getattr(space, axis))}
                                  for axis in ("hidden", "layers") if getattr(space, axis) != getattr(default, axis)}
    result.search["seconds"] = time.perf_counter() - t0
    return result


def _search_space(C: float, law: LossLaw, space: SearchSpace, top: int) -> PlanResult:
    """One grid search over a space with explicit ranges."""
    if space.n_shapes > MAX_SHAPES:
        raise UserError(f"the search space has {space.n_shapes:,} shapes (limit {MAX_SHAPES:,}); "
                        "use a larger STEP in --hidden/--layers")
    shapes, skipped = enumerate_shapes(space)
    n_valid = len(shapes["n_layer"])
    if n_valid == 0:
        raise UserError("no valid shape in the space: every n_embd/head_dim/KV-head combination fails the head "
                        "rule (head_dim must divide n_embd and the KV heads n_head); change --hidden, "
                        "--head-dims or --kv-heads")
    ev = evaluate(shapes, space, C, law)
    masks = ev["masks"]
    feasible = np.ones(n_valid, dtype=bool)
    for m in masks.values():
        feasible &= m
    if space.layout_checkpointing is not None and space.accelerator is not None:
        keep_shapes_a_layout_fits(shapes, ev, space, feasible, top)
    if not feasible.any():
        _explain_infeasible(C, space, shapes, ev)
    idx = np.flatnonzero(feasible)
    loss = ev["loss"][idx]
    if not np.isfinite(loss).all():
        raise UserError(f"the law {_law_text(law)} gives a loss outside float range for some shapes at C={C:.3g}; "
                        "check its parameters (--E/--A/--B/--alpha/--beta or the law file)")
    k = min(top, len(idx))
    part = np.argpartition(loss, k - 1)[:k] if k < len(idx) else np.arange(len(idx))
    order = part[np.lexsort((idx[part], loss[part]))]  # by loss, ties by enumeration order
    top_idx = idx[order]
    best_i = int(top_idx[0])
    best = candidate(best_i, shapes, ev, space, C, law, full=True)
    top_rows = [dict(candidate(int(i), shapes, ev, space, C, law), rank=r + 1) for r, i in enumerate(top_idx)]
    best["rank"] = 1

    cf = closed_form_comparison(law, C, best)
    binding = probe_beyond_edges(C, law, space, best)
    warnings = _warnings(best_i, shapes, ev, space, feasible, binding)
    info = {
        "C": C, "law": law.to_dict(), "space": space.describe(),
        "shapes_total": space.n_shapes, "shapes_valid": n_valid, "skipped": skipped,
        "skipped_total": int(sum(skipped.values())),
        "excluded": {name: int((~m).sum()) for name, m in masks.items()},
        "feasible": int(len(idx)),
        "binding": binding,
        "warnings": warnings,
    }
    curve = {"N": ev["N"][idx], "loss": loss, "D": ev["D"][idx]}
    return PlanResult(C=C, law=law, space=space, best=best, top=top_rows, closed_form=cf, search=info,
                      curve=curve)


def _step(values: tuple[int, ...]) -> int:
    """A range's step: its smallest gap, or an eighth of a single value."""
    v = sorted(set(values))
    return int(min(np.diff(v))) if len(v) > 1 else max(1, v[0] // 8)


EDGE_FLAGS = {"hidden": "--hidden MIN:MAX:STEP", "layers": "--layers MIN:MAX:STEP"}


def probe_beyond_edges(C: float, law: LossLaw, space: SearchSpace, best: dict[str, Any]) -> dict[str, Any] | None:
    """Does an edge of --hidden or --layers bind? Score the shapes up to PROBE_STEPS steps either way of
    the best (n_embd, n_layer) under every other constraint; the best of those lying outside a range,
    if it beats the plan, is returned with the ranges it lies outside ({axis: 'up' | 'down'}); else None."""
    hs, ls = sorted(set(space.hidden)), sorted(set(space.layers))
    around = range(-PROBE_STEPS, PROBE_STEPS + 1)
    hp = tuple(h for h in (best["n_embd"] + k * _step(space.hidden) for k in around) if h > 0)
    lp = tuple(n for n in (best["n_layer"] + k * _step(space.layers) for k in around) if n > 0)
    probe = dataclasses.replace(space, hidden=hp, layers=lp)
    shapes, _ = enumerate_shapes(probe)
    if not len(shapes["n_layer"]):
        return None
    ev = evaluate(shapes, probe, C, law)
    ok = np.isfinite(ev["loss"])
    for m in ev["masks"].values():
        ok &= m
    side = {"hidden": np.where(shapes["n_embd"] > hs[-1], 1, np.where(shapes["n_embd"] < hs[0], -1, 0)),
            "layers": np.where(shapes["n_layer"] > ls[-1], 1, np.where(shapes["n_layer"] < ls[0], -1, 0))}
    ok &= (side["hidden"] != 0) | (side["layers"] != 0)
    if not ok.any():
        return None
    j = int(np.flatnonzero(ok)[np.argmin(ev["loss"][ok])])
    if not ev["loss"][j] < best["loss"] - 1e-12:
        return None
    return {"axes": {axis: ("up" if side[axis][j] > 0 else "down") for axis in side if side[axis][j]},
            "n_layer": int(shapes["n_layer"][j]), "n_embd": int(shapes["n_embd"][j]),
            "n_head": int(shapes["n_head"][j]), "num_key_value_heads": int(shapes["num_key_value_heads"][j]),
            "N": float(ev["N"][j]), "D": float(ev["D"][j]), "loss": float(ev["loss"][j])}


def _grow(space: SearchSpace, binding: dict[str, Any] | None, growable: dict[str, bool]) -> SearchSpace | None:
    """The space with each binding default range extended the way it binds (max doubled, or min
    halved, same step); None when nothing can grow (no binding default range, a floor reached, or
    MAX_GROWN_SHAPES)."""
    if binding is None:
        return None
    changes = {}
    for axis, direction in binding["axes"].items():
        if not growable[axis]:
            continue
        values = sorted(set(getattr(space, axis)))
        step = _step(values)
        lo, hi = values[0], values[-1]
        if direction == "up":
            hi *= 2
        else:
            lo = max(lo - step * math.ceil(lo / (2 * step)), step if lo % step == 0 else lo % step)
        grown = tuple(range(lo, hi + 1, step))
        if grown != tuple(values):
            changes[axis] = grown
    if not changes:
        return None
    try:
        bigger = dataclasses.replace(space, **changes)
    except UserError:  # past a size limit (config.INT_LIMITS): the range stays, and the warning names it
        return None
    return bigger if bigger.n_shapes <= MAX_GROWN_SHAPES else None


def _law_text(law: LossLaw) -> str:
    return f"E={law.E:g}, A={law.A:g}, B={law.B:g}, alpha={law.alpha:g}, beta={law.beta:g}"


def check_law_at(law: LossLaw, C: float) -> None:
    """UserError unless the law's 6ND optimum at C is a model (>= 1 parameter and token, finite loss):
    parameters such as B = 1e308, beta = 1e-4 put it at N = 1e-887, and nothing said there means anything."""
    cf = law.closed_form(C)
    if not closed_form_is_a_model(cf):
        what = ("which no model can be" if math.isfinite(cf["loss"]) or not (1 <= cf["N"] < math.inf) else
                f"with a loss of {cf['loss']:g}")
        raise UserError(f"the law {_law_text(law)} puts the compute-optimal model at C={C:.3g} at N={cf['N']:.3g} "
                        f"parameters and D={cf['D']:.3g} tokens, {what}; check its parameters "
                        "(--E/--A/--B/--alpha/--beta or the law file)")


def candidate(i: int, shapes: dict[str, np.ndarray], ev: dict[str, Any], space: SearchSpace, C: float,
              law: LossLaw, full: bool = False) -> dict[str, Any]:
    """One shape's row: architecture, N, D (exact and rounded to whole sequences), C, loss."""
    fpt = float(ev["fpt"][i])
    D = float(ev["D"][i])
    N = float(ev["N"][i])
    sequences = int(D // space.seq_len)
    d_rounded = sequences * space.seq_len
    row: dict[str, Any] = {
        "n_layer": int(shapes["n_layer"][i]), "n_embd": int(shapes["n_embd"][i]),
        "n_head": int(shapes["n_head"][i]), "num_key_value_heads": int(shapes["num_key_value_heads"][i]),
        "head_dim": int(shapes["head_dim"][i]), "d_ff": int(shapes["d_ff"][i]),
        "vocab_size": space.vocab, "seq_len": space.seq_len,
        "N": int(N), "N_non_embedding": int(ev["N_non_embedding"][i]),
        "D": D, "D_rounded": d_rounded, "sequences": sequences,
        "C": fpt * D, "C_rounded": fpt * d_rounded,
        "flops_error": (fpt * D - C) / C, "flops_error_rounded": (fpt * d_rounded - C) / C,
        "training_flops_per_token": fpt, "flops_per_param_per_token": fpt / N,
        "loss": float(ev["loss"][i]), "tokens_per_param": D / N,
        "aspect": float(shapes["n_embd"][i] / shapes["n_layer"][i]),
    }
    kv, nh = row["num_key_value_heads"], row["n_head"]
    row["attention_type"] = "MHA" if kv == nh else ("MQA" if kv == 1 else f"GQA{kv}")
    if "memory" in ev:  # with --layout auto, the floor (choose_layout gives the best its layout's figure)
        key = "memory_per_gpu_bytes" if space.layout_checkpointing is None else "memory_floor_per_gpu_bytes"
        row[key] = float(ev["memory"][i])
    if full:
        cfg = space.model_config(row["n_layer"], row["n_embd"], row["n_head"], kv)
        row["name"] = cfg.name()
        row["ffn_ratio"] = row["d_ff"] / row["n_embd"]
        row["config"] = cfg.to_dict()
        if space.accelerator is not None:
            row["wall_clock"] = counting.training_time(fpt, d_rounded, space.accelerator, space.gpus, space.mfu)
    return row


def closed_form_comparison(law: LossLaw, C: float, best: dict[str, Any]) -> dict[str, Any]:
    """The C = 6ND optimum beside the grid's, and why they differ.

    The grid's shapes cost k·N training FLOPs per token with k = fpt/N (not 6): attention's
    12·L·S·n_embd adds to k; the input embedding (a lookup, not a matmul) and norms lower it.
    Spending C at k·N per token is the 6ND problem at the budget 6C/k, so the closed form at 6C/k
    is the FLOPs-convention-adjusted optimum; what remains is the grid being discrete.
    """
    cf = law.closed_form(C)
    k = best["flops_per_param_per_token"]
    adjusted = law.closed_form(C * 6.0 / k)
    attention = 12.0 * best["n_layer"] * best["seq_len"] * best["n_embd"] / best["N"]
    cf.update({
        "k_best": k, "attention_share_of_k": attention,
        "adjusted_for_k": {"budget_6C_over_k": C * 6.0 / k, "loss": adjusted["loss"], "N": adjusted["N"],
                           "D": adjusted["D"]},
        "loss_gap": best["loss"] - cf["loss"],
        "explanation": (f"the grid's best costs {k:.2f}·N FLOPs/token, not 6·N (attention 12·L·S·H adds "
                        f"{attention:.2f}; the embedding lookup is no matmul), so C buys the tokens 6ND would "
                        f"give at {6 / k:.3f}·C, where the closed form's loss is {adjusted['loss']:.4f}; the "
                        f"remaining {best['loss'] - adjusted['loss']:+.4f} comes from k changing with N, the grid's steps and its limits"),
    })
    return cf


def _warnings(best_i: int, shapes, ev, space: SearchSpace, feasible: np.ndarray,
              binding: dict[str, Any] | None) -> list[str]:
    out = []
    best_loss = float(ev["loss"][best_i])
    if binding is not None:
        flags = [EDGE_FLAGS[axis] for axis in binding["axes"]]
        out.append(f"the search space binds ({' and '.join(flags)}): past "
                   f"{'their edges' if len(flags) > 1 else 'its edge'} the best would be {binding['n_layer']}L x "
                   f"{binding['n_embd']}H, N={binding['N']:.3g}, D={binding['D']:.3g}, loss {binding['loss']:.4f} "
                   f"(vs {best_loss:.4f}); widen {' and '.join(f.split()[0] for f in flags)}")
    masks = ev["masks"]
    for name, flag in RELAX_FLAG.items():
        if name not in masks:
            continue
        others = np.ones_like(feasible)
        for other, m in masks.items():
            if other != name:
                others &= m
        if not others.any():
            continue
        j = int(np.flatnonzero(others)[np.argmin(ev["loss"][others])])
        if ev["loss"][j] < best_loss - 1e-12:
            out.append(f"{name.replace('_', '-')} binds: without it the best would be "
                       f"{int(shapes['n_layer'][j])}L x {int(shapes['n_embd'][j])}H, N={ev['N'][j]:.3g}, "
                       f"D={ev['D'][j]:.3g}, loss {ev['loss'][j]:.4f} (vs {best_loss:.4f}); "
                       + ("more data (a larger --max-tokens) would buy it" if name == "max_tokens" else f"relax {flag}"))
    ratio = float(ev["D"][best_i] / ev["N"][best_i])
    if ratio < 1:
        out.append(f"the budget buys fewer tokens than parameters (D/N = {ratio:.2g}); the law is untested "
                   f"there: use smaller --hidden/--layers or --enforce-chinchilla")
    return out


def _explain_infeasible(C: float, space: SearchSpace, shapes, ev) -> None:
    """No shape can spend C: say which constraint empties the space and what budget would work."""
    masks = ev["masks"]
    static = np.ones(len(ev["N"]), dtype=bool)
    for name, m in masks.items():
        if name not in BUDGET_DEPENDENT:
            static &= m
    if not static.any():
        parts = [f"{name.replace('_', '-')} excludes {int((~m).sum())}" for name, m in masks.items()
                 if name not in BUDGET_DEPENDENT and (~m).any()]
        flags = ", ".join(RELAX_FLAG[n] for n, m in masks.items() if n in RELAX_FLAG and n not in BUDGET_DEPENDENT
                          and (~m).any())
        raise UserError(f"no shape of the {len(ev['N'])} valid ones passes the filters ({'; '.join(parts)}); "
                        f"relax {flags} or change --hidden/--layers")
    fpt, d_lo, d_hi = ev["fpt"][static], ev["d_lo"][static], ev["d_hi"][static]
    possible = d_lo <= d_hi
    if not possible.any():
        # the token range [d_lo, d_hi] is empty for every shape: --max-tokens, or the Chinchilla band's top
        # (tokens_per_param·(1 + tolerance)·N), lies below one sequence or below the band's bottom
        limits = [f"--max-tokens {space.max_tokens:.3g}"] if space.max_tokens is not None else []
        if space.enforce_chinchilla:
            limits.append(f"the Chinchilla band (--tokens-per-param {space.tokens_per_param:g}, --tolerance "
                          f"{space.tolerance:g})")
        raise UserError(f"{' with '.join(limits)} leaves no token count any shape can train on (at least one "
                        f"sequence of {space.seq_len}); raise {' or '.join(_upper_limit_flags(space))}")
    c_lo, c_hi = (fpt * d_lo)[possible], (fpt * d_hi)[possible]
    if C < c_lo.min():
        raise UserError(f"C={C:.3g} FLOPs is too small for any shape in the space; the smallest budget that has "
                        f"one is {c_lo.min():.3g} FLOPs (or lower the minimums of --hidden/--layers)")
    if C > c_hi.max():
        limit = "--max-tokens" if space.max_tokens is not None else "the Chinchilla band"
        raise UserError(f"C={C:.3g} FLOPs is too large for any shape under {limit}; the largest budget that has "
                        f"one is {c_hi.max():.3g} FLOPs (raise --max-tokens, --tolerance or the maximums of "
                        f"--hidden/--layers)")
    nearest = [f"{c:.4g}" for c in (c_hi[c_hi < C].max() if (c_hi < C).any() else None,
                                       c_lo[c_lo > C].min() if (c_lo > C).any() else None) if c is not None]
    raise UserError(f"no shape spends exactly C={C:.4g} FLOPs inside the limits; the nearest budget"
                    f"{'s' if len(nearest) > 1 else ''} that {'have' if len(nearest) > 1 else 'has'} one: "
                    f"{' and '.join(nearest) or 'none'} FLOPs (or widen --tolerance, --hidden, --layers)")


def _upper_limit_flags(space: SearchSpace) -> list[str]:
    """The flags that bound D from above."""
    return ([*(["--max-tokens"] if space.max_tokens is not None else []),
             *(["--tokens-per-param", "--tolerance"] if space.enforce_chinchilla else [])])


def hardware_budget(gpus: int, accelerator: Accelerator, hours: float, mfu: float) -> float:
    """C = GPUs × peak dense bf16 FLOP/s × MFU × seconds."""
    return gpus * accelerator.peak_bf16_flops * mfu * hours * 3600.0
