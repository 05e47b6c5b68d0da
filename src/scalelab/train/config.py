"""The training config: a TOML file with sections [model] [data] [train] [eval] [checkpoint]
[parallel] [logging].

Every key is declared exactly once below, as a dataclass field with its type, default and a
one-line doc (`option(...)`). `load_config` checks names (unknown key -> UserError naming the
closest valid one) and types against these declarations, `config_reference_markdown()`
renders them as docs/training-config.md, and `TrainConfig.to_toml()` writes the resolved
config a run used. No torch here.

[model] is not declared here: it is resolved by `scalelab.presets.resolve_model_section`
(`preset = "gpt2"` or `style = "llama3"` plus fields, or full ModelConfig fields, which is
what `scalelab plan --emit-config` writes).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from scalelab.config import DEFAULT_LOSS_CHUNK_TOKENS, ModelConfig, apply_overrides, closest, load_toml
from scalelab.errors import UserError
from scalelab.layout import LAYOUT_KEYS, MESH_KEYS, PP_SCHEDULES, TRAINED_PP_SCHEDULES, Layout
from scalelab.train.schedule import DECAY_SHAPES

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")
STRATEGIES = ("auto", "none", "ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
ATTENTIONS = ("sdpa", "math")
AC_MODES = ("none", "full", "selective")


def checkpointing_mode(value: Any) -> Any:
    """train.activation_checkpointing as a mode: the bool it was before modes existed is read as
    full (true) or none (false), so old configs and run directories keep their meaning."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return value


def selective_option(value: Any) -> str | None:
    """train.selective_ac_option as its canonical string ("op", or a whole k >= 1 as digits), or
    None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value) if value >= 1 else None
    if isinstance(value, str):
        if value == "op":
            return value
        if value.isdigit() and int(value) >= 1:
            return str(int(value))
    return None


MAX_STEPS = 10**9  # a billion optimizer steps: ~1000x the longest published pretraining runs


def option(default: Any, doc: str, kind: str, choices: tuple[str, ...] | None = None,
           bounds: tuple[float, float] | None = None) -> Any:
    """A config key: its default, a one-line doc, its TOML type (int, float, bool, str, int?,
    float? (may be absent), float2 (a pair of numbers)) and, for numbers, the closed range
    [low, high] it must lie in (a number outside is an error naming the range: absurd values
    such as max_steps = 1e30 are refused before anything runs)."""
    meta = {"doc": doc, "kind": kind, "choices": choices, "bounds": bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSection:
    """Where the tokens come from (a directory written by `scalelab prepare`)."""
    dir: str = option("", "prepared data directory (meta.json + shards); relative paths are taken from the "
                      "current directory", "str")
    train_split: str = option("train", "split to train on", "str")
    val_split: str = option("val", "held-out split for eval", "str")


@dataclass
class TrainSection:
    """How long, how big a batch, and how the optimizer steps."""
    seq_len: int = option(1024, "tokens per sequence (≤ model block_size for learned positions)", "int",
                          bounds=(1, 2**24))
    micro_batch_size: int = option(8, "sequences per forward/backward on each device", "int",
                                  bounds=(1, 2**20))
    global_batch_tokens: int = option(0, "tokens per optimizer step over all devices; gradient accumulation = "
                                      "global_batch_tokens / (micro_batch_size × seq_len × world size). "
                                      "0 means one micro-batch per device", "int", bounds=(0, 2**40))
    max_steps: int | None = option(None, "training length in optimizer steps (give exactly one of max_steps, "
                                   "max_tokens, max_flops)", "int?", bounds=(1, MAX_STEPS))
    max_tokens: float | None = option(None, "training length in tokens, the planner's D (rounded up to whole "
                                      "steps)", "float?", bounds=(1, 1e16))
    max_flops: float | None = option(None, "training length in FLOPs, the planner's C, counted exactly by "
                                     "scalelab.counting.training_flops (rounded up to whole steps)", "float?",
                                     bounds=(1, 1e30))
    lr: float = option(3e-4, "peak learning rate", "float")
    min_lr: float = option(3e-5, "learning rate at the end of the decay", "float")
    warmup: float = option(100, "linear warmup from 0: steps (≥ 1) or a fraction of the run (< 1)", "float",
                           bounds=(0, MAX_STEPS))
    schedule: str = option("cosine", "decay after warmup: cosine / linear over the whole run, constant, or wsd "
                           "(warmup-stable-decay: hold lr, then decay over the last train.decay steps)", "str", SCHEDULES)
    decay: float = option(0.2, "wsd: the decay's length: steps (≥ 1) or a fraction of the run (< 1)", "float",
                          bounds=(0, MAX_STEPS))
    decay_shape: str = option("1-sqrt", "wsd: the decay's shape from lr to min_lr", "str", DECAY_SHAPES)
    branch_from: str = option("", "wsd: start from this checkpoint of a stable run (a checkpoint directory, "
                              "RUN/checkpoints/step_N, or a run directory for its newest): model, optimizer, data "
                              "position, step, tokens and FLOPs continue exactly, so the run is that stable run "
                              "continued and decayed. Its lr on the steps already taken must equal this "
                              "config's schedule. Empty: start at step 0", "str")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, applied to matrices (dim ≥ 2: linear "
                                 "weights and embeddings) only, never to norms or biases", "float")
    betas: list = option([0.9, 0.95], "AdamW (beta1, beta2)", "float2")
    eps: float = option(1e-8, "AdamW epsilon", "float")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = no clipping; the norm is "
                              "still logged)", "float")
    dtype: str = option("auto", "auto: bf16 on CUDA, fp32 elsewhere (bf16 autocast is slower than fp32 on "
                        "most CPUs); bf16: autocast (FSDP: bf16 params, fp32 reduce); fp16: autocast + "
                        "GradScaler; fp32: full precision", "str", DTYPES)
    compile: bool = option(False, "torch.compile each transformer block", "bool")
    activation_checkpointing: str = option("none", "recompute activations in backward (docs/memory.md): none; full "
                                           "(every block from its input); selective (see selective_ac_option). "
                                           "true and false are read as full and none", "checkpointing",
                                           AC_MODES)
    selective_ac_option: str = option("op", "under activation_checkpointing = \"selective\": \"op\" saves "
                                      "attention's and every other matmul's outputs in each block and recomputes "
                                      "the rest (torchtitan's op policy); an integer k (e.g. 2 or \"2\") fully "
                                      "recomputes every k-th block", "selective")
    check_memory: bool = option(True, "refuse to start when counting's predicted peak memory per device "
                                "exceeds the device's free memory (free GPU memory on CUDA, MemAvailable of "
                                "the host shared by its ranks on CPU); false starts anyway", "bool")
    attention: str = option("sdpa", "attention kernel: sdpa (fused) or math (explicit matmuls)", "str",
                            ATTENTIONS)
    loss_chunk_tokens: int = option(DEFAULT_LOSS_CHUNK_TOKENS, "score the loss this many tokens at a time (fused "
                                    "lm_head + cross-entropy: the [tokens × vocab] logits never exist at once; "
                                    "same loss and gradients). 0 = form all the logits at once", "int",
                                    bounds=(0, 2**24))
    router_bias_update_rate: float = option(0.001, "MoE with topk_method noaux_tc: after each optimizer step every "
                                            "expert's routing bias moves this much towards balance, b += rate · "
                                            "sign(mean load - load) (DeepSeek-V3's auxiliary-loss-free balancing; "
                                            "0 = frozen)", "float", bounds=(0.0, 1.0))
    seed: int = option(1337, "seeds model init and the data order", "int", bounds=(0, 2**32 - 1))
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (bitwise-reproducible runs; "
                                 "slower on GPU)", "bool")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", "str", DEVICES)
    init_from: str = option("", "start from these weights: a run directory (its newest checkpoint), a checkpoint, "
                            "or a model.safetensors + model.toml (or Hugging Face) directory, relative to the current "
                            "directory; weights only (new optimizer and schedule, step 0). [model] may differ from the source only in block_size, rope_theta "
                            "and rope_scaling: context extension (docs/context.md). Empty: random init", "str")


@dataclass
class EvalSection:
    """Held-out loss (and bits per byte when the tokenizer can decode)."""
    every: int = option(500, "evaluate every this many steps (0 = only at the end)", "int",
                        bounds=(0, MAX_STEPS))
    batches: int = option(20, "micro-batches of the val split per device per eval (the same ones every "
                          "time)", "int", bounds=(1, 10**6))
    at_end: bool = option(True, "evaluate after the last step", "bool")


@dataclass
class CheckpointSection:
    """Atomic checkpoints under RUN_DIR/checkpoints; resume is automatic."""
    every: int = option(1000, "checkpoint every this many steps (0 = only at the end and on "
                        "SIGTERM/SIGINT)", "int", bounds=(0, MAX_STEPS))
    keep: int = option(3, "keep the newest this many checkpoints (older ones are deleted)", "int",
                       bounds=(1, 10**6))
    on_signal: bool = option(True, "on SIGTERM/SIGINT finish the current step, checkpoint, and exit", "bool")


@dataclass
class ParallelSection:
    """How the run is spread over torchrun's WORLD_SIZE processes: a mesh pp × dp_replicate ×
    dp_shard × tp (docs/parallelism.md). With dp_replicate, dp_shard, tp and pp all at their
    defaults, `strategy` decides (the old keys: auto = DDP under torchrun)."""
    strategy: str = option("auto", "auto: ddp when launched by torchrun with >1 process, else none; fsdp "
                           "shards parameters, gradients and optimizer state (FSDP2 per block + root). "
                           "Used only when dp_replicate, dp_shard, tp and pp are all at their defaults (fsdp "
                           "also agrees with layout keys that shard the data dimension)",
                           "str", STRATEGIES)
    dp_replicate: int = option(1, "full replicas of the model (DDP alone; HSDP's replica dimension with "
                               "dp_shard > 1)", "int", bounds=(1, 2**20))
    dp_shard: int = option(-1, "FSDP2 shards parameters, gradients and optimizer state over this many ranks; "
                           "-1 = the rest of WORLD_SIZE after dp_replicate × tp × pp", "int", bounds=(-1, 2**20))
    tp: int = option(1, "tensor parallelism: split every block's matrices (and the vocabulary) over this many "
                     "ranks; must divide n_head, num_key_value_heads, the FFN width and vocab_size", "int",
                     bounds=(1, 2**20))
    pp: int = option(1, "pipeline parallelism: split the layers into this many stages (one per rank group)",
                     "int", bounds=(1, 2**20))
    pp_schedule: str = option("1F1B", "pipeline schedule (torch.distributed.pipelining); Interleaved1F1B, "
                              "LoopedBFS, InterleavedZeroBubble and ZBVZeroBubble run pp_stages_per_rank > 1",
                              "str", PP_SCHEDULES)
    pp_microbatches: int = option(0, "micro-batches each local batch is split into for the pipeline "
                                  "(≥ pp; 0 = pp × pp_stages_per_rank)", "int", bounds=(0, 2**20))
    pp_stages_per_rank: int = option(1, "virtual pipeline stages per rank (interleaved schedules)", "int",
                                     bounds=(1, 2**10))
    sequence_parallel: bool = option(True, "with tp > 1: norms and the residual stream between blocks are "
                                     "split over the sequence (activations ÷ tp)", "bool")
    loss_parallel: bool = option(False, "with tp > 1: compute the cross-entropy on vocabulary-sharded logits "
                                 "(no all-gather of the logits)", "bool")
    backend: str = option("auto", "process group backend: auto is nccl on GPU, gloo on CPU", "str", BACKENDS)
    reshard_after_forward: bool = option(True, "FSDP: free gathered block parameters after forward "
                                         "(ZeRO-3; false keeps them until backward, ZeRO-2-like)", "bool")


@dataclass
class LoggingSection:
    """Console lines on stderr and RUN_DIR/metrics.jsonl."""
    every: int = option(10, "log a console line and a metrics.jsonl record every this many steps", "int",
                        bounds=(1, MAX_STEPS))
    run_dir: str = option("", "run directory (default runs/<config file name>); --run-dir overrides", "str")
    peak_tflops: float = option(0.0, "peak TFLOP/s per device for MFU; 0 = the hardware table's dense bf16 "
                                "peak for the detected GPU (MFU is n/a on CPU unless set)", "float",
                                bounds=(0, 1e6))
    tensorboard: bool = option(False, "also write TensorBoard scalars to RUN_DIR/tensorboard (if installed)",
                               "bool")
    wandb_project: str = option("", "also log to this Weights & Biases project (if installed)", "str")


SECTIONS: dict[str, type] = {
    "data": DataSection, "train": TrainSection, "eval": EvalSection, "checkpoint": CheckpointSection,
    "parallel": ParallelSection, "logging": LoggingSection,
}
ALL_SECTIONS = ("model", *SECTIONS)


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str = ""  # the file it came from (not written back)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.to_dict()}
        for name in SECTIONS:
            section = {k: v for k, v in dataclasses.asdict(getattr(self, name)).items() if v is not None}
            out[name] = section
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @property
    def warmup_is_fraction(self) -> bool:
        return self.train.warmup < 1


# ---- loading ------------------------------------------------------------------------------------

def _check_value(value: Any, kind: str, where: str) -> Any:
    def bad(what: str) -> UserError:
        return UserError(f"{where} must be {what}, got {value!r}")

    base = kind.rstrip("?")
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("finite")
        return float(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base == "checkpointing":
        value = checkpointing_mode(value)
        if not isinstance(value, str):
            raise bad("one of none, full, selective (or true / false)")
        return value
    if base == "selective":
        chosen = selective_option(value)
        if chosen is None:
            raise bad('"op" or a whole number k >= 1 (checkpoint every k-th block)')
        return chosen
    if base == "float2":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
            raise bad("a pair of numbers such as [0.9, 0.95]")
        return [float(v) for v in value]
    raise AssertionError(kind)


def _build_section(cls: type, table: Any, name: str, where: str) -> Any:
    if not isinstance(table, Mapping):
        raise UserError(f"{where}: [{name}] must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key '{name}.{key}'{closest(key, fields)}; "
                            f"valid keys in [{name}]: {', '.join(fields)}")
        meta = fields[key].metadata
        value = _check_value(value, meta["kind"], f"{where}: {name}.{key}")
        if meta["choices"] and value not in meta["choices"]:
            raise UserError(f"{where}: {name}.{key} must be one of {', '.join(meta['choices'])}; got {value!r}")
        if meta["bounds"] and not meta["bounds"][0] <= value <= meta["bounds"][1]:
            low, high = meta["bounds"]
            raise UserError(f"{where}: {name}.{key} must be in [{_number(low)}, {_number(high)}], got {_number(value)}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
    """Check a parsed TOML document and build a TrainConfig (UserError on the first problem)."""
    from scalelab.presets import resolve_model_section

    for key, value in data.items():
        if key not in ALL_SECTIONS:
            raise UserError(f"{where}: unknown section [{key}]{closest(key, ALL_SECTIONS)}; "
                            f"sections: {', '.join(ALL_SECTIONS)}")
    if "model" not in data:
        raise UserError(f"{where}: no [model] section; give `preset = \"gpt2\"`, a style with sizes, or full fields")
    if not isinstance(data["model"], Mapping):
        raise UserError(f"{where}: [model] must be a table")
    model = resolve_model_section(data["model"], where=f"{where} [model]")
    sections = {name: _build_section(cls, data.get(name, {}), name, where) for name, cls in SECTIONS.items()}
    cfg = TrainConfig(model=model, source=where, **sections)
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a training config TOML and apply `--set section.key=value` overrides."""
    data = load_toml(path)
    overrides = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and "." not in key:
            raise UserError(f"--set {item}: name the section, e.g. train.{key}=... or model.{key}=...")
    data = apply_overrides(copy.deepcopy(data), overrides)
    return config_from_dict(data, where=str(path))


def validate(cfg: TrainConfig) -> None:
    t, where = cfg.train, cfg.source or "config"
    if not cfg.data.dir:
        raise UserError(f"{where}: data.dir is not set; point it at a directory made by `scalelab prepare`")
    lengths = [k for k in ("max_steps", "max_tokens", "max_flops") if getattr(t, k) is not None]
    if len(lengths) != 1:
        raise UserError(f"{where}: give exactly one of train.max_steps, train.max_tokens, train.max_flops "
                        f"(got {', '.join(lengths) or 'none'})")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        raise UserError(f"{where}: need train.lr > 0 and 0 ≤ train.min_lr ≤ train.lr (got {t.lr:g}, {t.min_lr:g})")
    if t.warmup >= 1 and not float(t.warmup).is_integer():
        raise UserError(f"{where}: train.warmup must be a whole number of steps or a fraction in [0, 1), got {t.warmup:g}")
    if not all(0 <= b < 1 for b in t.betas):
        raise UserError(f"{where}: train.betas must be in [0, 1), got {t.betas}")
    if t.weight_decay < 0 or t.grad_clip < 0 or t.eps <= 0:
        raise UserError(f"{where}: train.weight_decay and train.grad_clip must be ≥ 0 and train.eps > 0")
    if cfg.model.position_encoding == "learned" and t.seq_len > cfg.model.block_size:
        raise UserError(f"{where}: train.seq_len {t.seq_len} exceeds the model's {cfg.model.block_size} learned "
                        f"positions; lower train.seq_len or raise model.block_size")
    if cfg.model.rope_scaling and cfg.model.position_encoding != "rope":
        raise UserError(f"{where}: model.rope_scaling scales RoPE, but this model has learned positions; drop "
                        "rope_scaling or set model.position_encoding = \"rope\"")
    if t.branch_from and t.schedule != "wsd":
        raise UserError(f"{where}: train.branch_from continues a stable run into a decay, which needs "
                        f"train.schedule = \"wsd\" (got {t.schedule!r})")
    if t.branch_from and t.init_from:
        raise UserError(f"{where}: give train.branch_from or train.init_from, not both (a branch takes its weights "
                        "from the stable run's checkpoint)")
    if cfg.parallel.strategy == "fsdp" and t.dtype == "fp16":
        raise UserError(f"{where}: FSDP with fp16 is not supported (no sharded grad scaler); use dtype bf16")
    if _layout_keys_set(cfg.parallel):
        # fsdp agrees with a layout whose data dimension is sharded (dp_shard = -1 or > 1)
        if cfg.parallel.strategy not in ("auto", "fsdp") or (cfg.parallel.strategy == "fsdp"
                                                             and cfg.parallel.dp_shard == 1):
            raise UserError(f"{where}: parallel.strategy = {cfg.parallel.strategy} and the layout keys (dp_replicate, "
                            f"dp_shard, tp, pp) say different things about how to spread the run; drop "
                            f"parallel.strategy (leave it \"auto\") and use the layout keys alone")
        if t.dtype == "fp16":
            raise UserError(f"{where}: a layout with dp_shard, tp or pp does not support fp16 (no sharded grad "
                            f"scaler); use train.dtype = \"bf16\"")


def _layout_keys_set(p: ParallelSection) -> bool:
    """Whether any of the mesh degrees differs from its default (then they, not strategy, decide)."""
    return any(getattr(p, k) != getattr(Layout(), k) for k in MESH_KEYS)


def layout_of(cfg: TrainConfig, world_size: int) -> Layout:
    """The validated, resolved Layout this config runs on world_size processes (UserError with one
    line naming the fix otherwise). With dp_replicate, dp_shard, tp and pp at their defaults the old
    parallel.strategy decides (Layout.from_strategy: auto = DDP under torchrun, none in one process)."""
    p = cfg.parallel
    keys = {k: getattr(p, k) for k in LAYOUT_KEYS}
    if _layout_keys_set(p):
        layout = Layout(**keys)
    else:
        base = Layout.from_strategy(p.strategy, world_size)
        layout = base.replace(**{k: v for k, v in keys.items() if k not in MESH_KEYS})
    layout = layout.validate(cfg.model, world_size)
    if layout.pp > 1 and layout.pp_schedule not in TRAINED_PP_SCHEDULES:
        raise UserError(f"parallel.pp_schedule = {layout.pp_schedule} can be counted but not trained here (its "
                        f"forward-only pass, which evaluation needs, fails in torch 2.13); train with one of "
                        f"{', '.join(TRAINED_PP_SCHEDULES)}")
    return layout


# ---- derived quantities -------------------------------------------------------------------------

def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """global_batch_tokens / (micro_batch_size × seq_len × world_size), which must be whole."""
    t = cfg.train
    per_micro = t.micro_batch_size * t.seq_len * world_size
    if t.global_batch_tokens == 0:
        return 1
    if t.global_batch_tokens % per_micro:
        lower = max(per_micro, t.global_batch_tokens // per_micro * per_micro)
        raise UserError(f"train.global_batch_tokens {t.global_batch_tokens} is not a multiple of micro_batch_size "
                        f"× seq_len × world size = {t.micro_batch_size} × {t.seq_len} × {world_size} = {per_micro}; "
                        f"use e.g. {lower} or {lower + per_micro}")
    return t.global_batch_tokens // per_micro


def total_steps(cfg: TrainConfig, tokens_per_step: int, flops_per_step: float) -> int:
    """Optimizer steps of the run (at most MAX_STEPS: UserError naming the length key otherwise)."""
    t = cfg.train
    if t.max_steps is not None:
        return int(t.max_steps)
    key, length, per_step = (("max_tokens", t.max_tokens, tokens_per_step) if t.max_tokens is not None
                             else ("max_flops", t.max_flops, flops_per_step))
    steps = max(1, math.ceil(length / per_step))
    if steps > MAX_STEPS:
        raise UserError(f"train.{key} = {length:g} at {per_step:,} per step is {steps:.3g} steps, more than "
                        f"{MAX_STEPS:,}; lower train.{key} or raise the batch (train.global_batch_tokens)")
    return steps


def sequences_per_step(train: Mapping[str, Any], world_size: int) -> int:
    """Sequences in one optimizer step over all ranks, from a [train] table (as in config.toml)."""
    if train.get("global_batch_tokens", 0):
        return int(train["global_batch_tokens"]) // int(train["seq_len"])
    return int(train["micro_batch_size"]) * world_size


# The resume rule (docs/training.md): a checkpoint's finished steps were trained on a model, with
# data in an order fixed by (seed, step, sequences per step, seq_len), in a precision. Changing any
# of these keys changes what those steps meant, so resuming with a change is refused (as is a change
# of the global batch in sequences, or of the data itself, checked where they are known). Every
# other key changes only the steps still to run, and is accepted with a printed diff.
RESUME_FIXED = ("data.train_split", "train.seq_len", "train.seed", "train.dtype", "train.init_from",
                "train.branch_from")


def resume_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The keys that differ between the config a checkpoint was trained with and the one resuming
    it (both as TrainConfig.to_dict() gives them), as "section.key old -> new" lines, split by the
    resume rule into (refused, accepted). The run directory is where the run is, not a setting. A
    key that the checkpoint's config lacks (written before the key existed) had its default."""
    def flat(d: Mapping[str, Any]) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, table in d.items() for k, v in table.items()}

    defaults = {f"{name}.{f.name}": f.default for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    a, b = {**defaults, **flat(old)}, {**defaults, **flat(new)}
    for d in (a, b):  # a config written before the modes said true / false
        d["train.activation_checkpointing"] = checkpointing_mode(d["train.activation_checkpointing"])
    refused, accepted = [], []
    for key in sorted(set(a) | set(b)):
        if key == "logging.run_dir" or a.get(key) == b.get(key):
            continue
        line = f"{key} {_shown(a.get(key))} -> {_shown(b.get(key))}"
        (refused if key.startswith("model.") or key in RESUME_FIXED else accepted).append(line)
    return refused, accepted


def _shown(v: Any) -> str:
    return "unset" if v is None else _toml_value(v)


def warmup_steps(warmup: float, steps: int) -> int:
    """train.warmup in steps: a whole number of steps, or a fraction (< 1) of the run's `steps`."""
    return int(round(warmup * steps)) if warmup < 1 else int(warmup)


def schedule_settings(train: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """The keywords of schedule.learning_rate for a run of `steps` steps, from a [train] table (as
    TrainConfig.to_dict() gives it; keys a config from before them lacks take their defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSection)}
    t = {**defaults, **train}
    return {"lr": t["lr"], "min_lr": t["min_lr"], "warmup": warmup_steps(t["warmup"], steps), "total": steps,
            "schedule": t["schedule"], "decay": warmup_steps(t["decay"], steps) if t["schedule"] == "wsd" else 0,
            "decay_shape": t["decay_shape"]}


def schedule_problem(settings: Mapping[str, Any]) -> str | None:
    """Why a resolved schedule (schedule_settings) cannot run, or None."""
    if settings["schedule"] != "wsd":
        return None
    if settings["decay"] < 1:
        return (f"train.decay {settings['decay']} steps: a wsd schedule needs a decay of at least one step; raise "
                "train.decay (steps, or a fraction of the run)")
    if settings["warmup"] + settings["decay"] > settings["total"]:
        return (f"train.warmup ({settings['warmup']} steps) + train.decay ({settings['decay']} steps) exceed the "
                f"run's {settings['total']} steps; shorten them or lengthen the run")
    return None


# ---- documentation ------------------------------------------------------------------------------

def config_reference_markdown() -> str:
    """docs/training-config.md, generated from the declarations above (tests keep it in sync)."""
    lines = [
        "# Training config reference",
        "",
        "<!-- generated by scalelab.train.config.config_reference_markdown(); do not edit by hand -->",
        "",
        "A training config is a TOML file with the sections below. Any key can be overridden on the",
        "command line: `scalelab train CONFIG.toml --set train.lr=1e-3 --set model.n_layer=4`.",
        "Unknown keys and wrong types are errors (exit status 2) that name the closest valid key.",
        "",
        "## [model]",
        "",
        "Either `preset = \"NAME\"` (an official model: `scalelab count --help` lists them) plus field",
        "overrides, or `style = \"gpt2\" | \"llama2\" | \"llama3\"` plus `n_layer`, `n_embd`, `n_head` and",
        "overrides, or every ModelConfig field (what `scalelab plan --emit-config` writes). Fields:",
        "`n_layer, n_head, n_embd, num_key_value_heads, d_ff, ffn_expansion_ratio, multiple_of,",
        "vocab_size, block_size, normalization, norm_eps, position_encoding, rope_theta, rope_scaling,",
        "ffn_type, norm_position, bias, tie_embeddings, family`.",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines += [f"## [{name}]", "", (cls.__doc__ or "").strip(), "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = {"int?": "int", "float?": "float", "float2": "[float, float]", "checkpointing": "str",
                    "selective": "str or int"}.get(f.metadata["kind"],
                                                                                      f.metadata["kind"])
            shown = "—" if default is None else f"`{_toml_value(default)}`"
            doc = f.metadata["doc"]
            if f.metadata["choices"]:
                doc += " (" + " \\| ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
            if f.metadata["bounds"]:
                doc += " (from {} to {})".format(*map(_number, f.metadata["bounds"]))
            lines.append(f"| `{f.name}` | {kind} | {shown} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def _number(v: float) -> str:
    """A bound or a value as written in messages and the reference: integers exactly, floats short."""
    return f"{v:,}" if isinstance(v, int) and abs(v) < 10**15 else f"{v:g}"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":  # python -m scalelab.train.config > docs/training-config.md
    print(config_reference_markdown())
