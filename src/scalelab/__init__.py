"""scalelab: plan, build and train LLaMA-family language models at compute-optimal scale.

Public names resolve lazily, so `import scalelab` (and `scalelab count`/`plan`/`fit`) never
imports torch; `scalelab.Transformer` does.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "scalelab.config",
    "get_preset": "scalelab.presets",
    "style_config": "scalelab.presets",
    "PRESETS": "scalelab.presets",
    "count_params": "scalelab.counting",
    "LossLaw": "scalelab.scaling.laws",
    "Transformer": "scalelab.model",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'scalelab' has no attribute {name!r}")
