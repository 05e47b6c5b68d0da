"""`[train] init_from`: start a run from another model's weights (weights only: a new optimizer,
a new schedule, step 0), the recipe for context extension (docs/context.md).

The source is a run directory (its newest intact checkpoint), a checkpoint directory (either
layout), or a model directory (model.safetensors + model.toml, e.g. RUN/final, or a Hugging Face
directory). The new run's [model] may differ from the source's only in the position fields
(block_size, rope_theta, rope_scaling): every other field would change a weight's shape or what the
weights compute, and is refused naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scalelab.config import ModelConfig
from scalelab.errors import UserError

# The fields a context extension changes. block_size sizes no weight of a RoPE model (it is the
# context the model is meant for); with learned positions it is the position table's length, so
# there it is compared like any other field.
POSITION_FIELDS = ("block_size", "rope_theta", "rope_scaling")


def resolve_source(path: str) -> tuple[Path, ModelConfig]:
    """(the directory whose weights to load, its ModelConfig) for train.init_from = `path`."""
    from scalelab import hf
    from scalelab.train import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise UserError(f"train.init_from: {p}: no such run directory, checkpoint or model directory")
    has_weights = (p / "model.safetensors").is_file() or (p / hf.SAFETENSORS_INDEX).is_file()
    if has_weights and not (p / ckpt.TRAINER_STATE).is_file():
        native = hf.native_config(p)
        if native is not None:
            return p, native
        if (p / "config.json").is_file():
            return p, hf.config_from_hf(hf.read_json(p / "config.json"), str(p / "config.json"))
    source = ckpt.resolve_checkpoint(p)
    return source, ModelConfig.from_toml(source / "model.toml")


def _comparable(cfg: ModelConfig, rope: bool) -> dict[str, Any]:
    """The fields that must match, with the FFN width resolved (d_ff, or ffn_expansion_ratio rounded
    up to a multiple_of: spellings of one size), `family` (a name prefix) left out, and with `rope`
    (both models use RoPE) the position fields left out."""
    fields = cfg.to_dict()
    fields["d_ff"] = cfg.ffn_hidden
    for name in ("ffn_expansion_ratio", "multiple_of", "family", *(POSITION_FIELDS if rope else ())):
        fields.pop(name, None)
    return fields


def weight_changes(source: ModelConfig, target: ModelConfig) -> list[str]:
    """'model.FIELD old -> new' for every field other than the position fields that differs, in
    ModelConfig's field order (the sizes first)."""
    rope = source.position_encoding == target.position_encoding == "rope"
    a, b = _comparable(source, rope), _comparable(target, rope)
    return [f"model.{f.name} {a.get(f.name)!r} -> {b.get(f.name)!r}" for f in dataclasses.fields(ModelConfig)
            if a.get(f.name) != b.get(f.name)]


def _recorded_tokenizer(source: Path) -> Any:
    """The tokenizer recorded beside the source's weights (data.json of the run or of RUN/final), or None."""
    for where in (source, source.parent.parent):
        try:
            return json.loads((where / "data.json").read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _identity(tokenizer: Mapping[str, Any]) -> tuple:
    """What makes two tokenizers the same: their kind and the hash of their files (not the path)."""
    return tokenizer.get("kind"), tokenizer.get("sha256")


def check_source(path: str, target: ModelConfig, data_metadata: Mapping[str, Any]) -> Path:
    """The source directory for init_from, after checking that its weights fit the new [model] and
    that it was trained with the data's tokenizer (UserError, one line, otherwise)."""
    source, cfg = resolve_source(path)
    changes = weight_changes(cfg, target)
    if changes:
        raise UserError(f"train.init_from {path}: {changes[0]} (the source's value first); init_from keeps the "
                        f"source's weights, so [model] may differ from it only in {', '.join(POSITION_FIELDS)}"
                        + ("" if target.position_encoding == "rope" else " (block_size only with RoPE)")
                        + ": set the source's value, or train from scratch without init_from")
    scaling = target.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "yarn" and "original_max_position_embeddings" not in scaling:
        raise UserError(f"train.init_from {path}: rope_scaling yarn needs original_max_position_embeddings, the "
                        f"context the source was trained at (its block_size is {cfg.block_size}); without it "
                        f"YaRN would take the new block_size {target.block_size}")
    recorded, used = _recorded_tokenizer(source), data_metadata.get("tokenizer")
    if isinstance(recorded, dict) and isinstance(used, dict) and _identity(recorded) != _identity(used):
        raise UserError(f"train.init_from {path}: the source was trained with tokenizer {recorded.get('spec')!r} but "
                        f"data.dir was prepared with {used.get('spec')!r}; prepare the data with the source's "
                        "tokenizer (scalelab prepare --tokenizer ...)")
    return source


def load_weights(source: Path) -> dict[str, torch.Tensor]:
    """The source's full state dict, fp32, on the CPU (names as our Transformer's)."""
    from scalelab.train.checkpoint import load_model_for_inference

    model = load_model_for_inference(source, device="cpu", dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}
