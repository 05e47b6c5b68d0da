"""Downstream benchmarks (HellaSwag, ARC, ...) through EleutherAI's lm-evaluation-harness.

`evaluate_tasks` takes any model scalelab can read (a run directory, a trainer or native
checkpoint, a Hugging Face directory), gives the harness its Hugging Face form (the directory
itself, or an export with the run's tokenizer into a temporary directory) and runs the harness's
own `hf` model class on it, so the numbers are the ones the harness reports for any transformers
model: its tokenization of context and continuation, its truncation, its metrics. It prints the
harness's table and writes the harness's JSON beside the run (lm_eval_results.json).

The harness is an optional dependency: `pip install "scalelab[eval]"`. See docs/eval-harness.md.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scalelab.errors import UserError
from scalelab.files import atomic_write_text, check_output_file

RESULTS_FILE = "lm_eval_results.json"
INSTALL = 'pip install "scalelab[eval]"'
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def evaluate_tasks(model_path: str | os.PathLike, tasks: Sequence[str], *, out_dir: str | os.PathLike | None = None,
                   limit: float | None = None, device: str = "cpu", batch_size: int = 1,
                   include_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the harness's TASKS on the model at MODEL_PATH; return the harness's results dict.

    Writes OUT_DIR/lm_eval_results.json (default OUT_DIR: the run directory MODEL_PATH belongs to,
    else MODEL_PATH itself) and prints the harness's table to stdout (the JSON's path to stderr).
    `limit` caps the documents per task (a fraction of them if < 1: the harness's --limit).
    `include_path` is a directory of extra task YAMLs (the harness's --include_path). Bad input
    (lm_eval not installed, an unknown task, a model without a tokenizer, an unwritable output)
    is a one-line UserError raised before any model is loaded; so is a task whose data set
    cannot be fetched. On a data-parallel launch's ranks > 0 it returns {}."""
    lm_eval, make_table, handle_non_serializable = _import_harness()
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise UserError(f"{model_path}: no such model directory; give a run directory, a checkpoint or a "
                        "Hugging Face directory")
    names = _task_names(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"task directory {include_path}: no such directory; give a directory of task YAML files")
    task_manager = _task_manager(str(Path(include_path).resolve()) if include_path is not None else None)
    _check_known(names, task_manager)
    out_file = check_output_file(Path(out_dir if out_dir is not None else results_directory(model_path)) / RESULTS_FILE,
                                 flag="lm_eval results")
    with tempfile.TemporaryDirectory(prefix="scalelab-lm-eval-") as scratch:
        pretrained = hf_form(model_path, Path(scratch))
        try:
            results = lm_eval.simple_evaluate(
                # an absolute path: the harness asks the Hub for a model's SHA unless the name cannot be a repo id
                model="hf", model_args={"pretrained": str(pretrained.resolve()), "dtype": "float32"}, tasks=names,
                task_manager=task_manager, limit=limit, device=device, batch_size=batch_size, log_samples=False)
        except ConnectionError as e:  # a task's dataset is fetched from the Hub on first use
            raise UserError(f"cannot fetch the data of {', '.join(names)} ({e}); the harness downloads each task's "
                            "data set from the Hugging Face Hub once and caches it: run once with network access, "
                            "or use a local task from an include path") from None
    if results is None:  # a data-parallel launch's rank > 0: rank 0 prints and writes
        return {}
    results["config"]["model_args"] = {"pretrained": str(model_path), "dtype": "float32"}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
    atomic_write_text(out_file, text)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(f"scalelab: wrote {out_file}", file=sys.stderr)
    return results


def _import_harness():
    """(lm_eval, make_table, handle_non_serializable), or a one-line UserError naming the extra.
    The `hf` model class also needs accelerate (lm_eval's own `hf` extra), so import it here too."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # the `hf` model class: accelerate, transformers
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        raise UserError(f"downstream tasks need EleutherAI's lm-evaluation-harness ({e}); install it with "
                        f"{INSTALL}") from None
    return lm_eval, make_table, handle_non_serializable


@functools.cache
def _task_manager(include_path: str | None):
    """The harness's index of its ~15k task YAMLs (and INCLUDE_PATH's): seconds to build, so
    built once per process and include path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_names(tasks: Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise UserError("no task given; name one or more harness tasks, e.g. hellaswag,arc_easy")
    return names


def _check_known(names: list[str], task_manager) -> None:
    """A UserError naming the first task (or group, or tag) the harness does not know."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown task {name!r}: {hint}the harness knows {len(known)} tasks, groups and tags "
                        "(list them with `lm-eval ls tasks`); a task of your own needs its YAML directory as "
                        "the include path")


def results_directory(model_path: Path) -> Path:
    """Where the harness JSON goes by default: the run directory MODEL_PATH is or lies in (a
    checkpoint's run), else MODEL_PATH itself."""
    from scalelab.train.trainer import enclosing_run_dir

    return enclosing_run_dir(model_path) or model_path


def hf_form(model_path: Path, scratch: Path) -> Path:
    """A Hugging Face directory (config.json + safetensors + tokenizer) holding MODEL_PATH: the
    directory itself when it is one, else MODEL_PATH exported into SCRATCH with its run's
    tokenizer."""
    from scalelab import hf
    from scalelab.data.tokenizer import find_run_tokenizer
    from scalelab.train.checkpoint import load_model_for_inference

    if hf.native_config(model_path) is None and (model_path / "config.json").is_file():
        if not any((model_path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"{model_path}: a Hugging Face directory without tokenizer files; the harness needs "
                            "its tokenizer (tokenizer.json or tokenizer.model) beside config.json")
        return model_path
    tokenizer = find_run_tokenizer(model_path)
    if tokenizer is None:
        raise UserError(f"{model_path}: no tokenizer with this model (no data.json + tokenizer/ beside it or in a "
                        f"parent); export it with `scalelab export-hf {model_path} DIR --tokenizer SPEC` and "
                        "evaluate DIR")
    model = load_model_for_inference(model_path)
    hf.save(model, scratch, tokenizer=tokenizer)
    return scratch
