"""Running a designed sweep through submitit: the same code path for local processes and Slurm.

Each run is one submitit job calling `train_one(sweep_dir, name, ...)`, which trains the run's
config from OUT_DIR/sweep.toml into OUT_DIR/runs/NAME with `scalelab.train.trainer.train` (one
process), or under `torchrun` inside the job (--gpus-per-run > 1). The trainer resumes a run from
its newest checkpoint and reports a finished one as complete, so running the sweep again skips
what is done and continues what was interrupted. Decay branches (method wsd) are submitted once
their stable run has finished.

`run_sweep` keeps at most `parallel` jobs in flight, retries a failed run up to `retries` times,
records attempts and errors in OUT_DIR/state.json, and redraws the status table (runs' states,
tokens/s and ETA from their metrics.jsonl) on stderr as things change.
"""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

from scalelab.errors import UserError
from scalelab.files import atomic_write_text
from scalelab.sweep.design import read_sweep

STATE_FILE = "state.json"
LOCK_FILE = ".sweep.lock"
SUBMITIT_DIR = "submitit"
EXECUTORS = ("local", "slurm")


# ---- one run (inside the job) -------------------------------------------------------------------

def split_problem(run: dict[str, Any], processes: int) -> str | None:
    """Why the run's global batch cannot be split over `processes` ranks, or None."""
    t = run["config"]["train"]
    sequences = t["global_batch_tokens"] // t["seq_len"]
    if sequences % processes:
        return (f"{run['name']}: its batch of {sequences} sequences does not split over {processes} processes; "
                f"design the sweep with a --batch-tokens that is a multiple of {processes} x --seq-len")
    return None


def run_config(sweep_dir: Path, run: dict[str, Any], processes: int = 1) -> dict[str, Any]:
    """The run's training config with its paths made absolute (branch_from, written relative to the
    sweep directory, and the run directory) and its micro-batch fitted to `processes` ranks (the
    global batch in sequences, which fixes the data order, is unchanged)."""
    import copy

    data = copy.deepcopy(run["config"])
    if processes > 1:
        if (why := split_problem(run, processes)) is not None:
            raise UserError(why)
        t = data["train"]
        per_rank = t["global_batch_tokens"] // t["seq_len"] // processes
        t["micro_batch_size"] = max(d for d in range(1, min(t["micro_batch_size"], per_rank) + 1) if per_rank % d == 0)
    if data["train"].get("branch_from"):
        data["train"]["branch_from"] = str((sweep_dir / data["train"]["branch_from"]).resolve())
    data.setdefault("logging", {})["run_dir"] = str((sweep_dir / run["run_dir"]).resolve())
    return data


def train_one(sweep_dir: str, name: str, gpus: int = 1, threads: int = 0) -> dict[str, Any]:
    """Train run `name` of the sweep (resuming it, or reporting it complete). The submitit job."""
    sweep_dir_p = Path(sweep_dir)
    run = runs_by_name(read_sweep(sweep_dir_p))[name]
    data = run_config(sweep_dir_p, run, gpus)
    run_dir = Path(data["logging"]["run_dir"])
    if gpus > 1:
        import tomli_w

        config = sweep_dir_p / "jobs" / (name.replace("/", "__") + ".toml")
        config.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config, tomli_w.dumps(data))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "scalelab", "train", str(config), "--run-dir", str(run_dir)]
        subprocess.run(cmd, check=True)
        return {"run_dir": str(run_dir), "exit_code": 0}
    import torch

    from scalelab.train.config import config_from_dict
    from scalelab.train.trainer import train

    if threads > 0:
        torch.set_num_threads(threads)
    summary = train(config_from_dict(data, where=f"{sweep_dir}/sweep.toml run {name}"), run_dir)
    if summary.get("exit_code", 0):
        raise RuntimeError(f"{name} stopped at step {summary.get('step')} (exit code {summary['exit_code']})")
    return summary


def runs_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in doc["runs"]}


# ---- what each run's directory says ----------------------------------------------------------------

def run_progress(sweep_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    """A run's state from its directory alone: done / running / interrupted / pending, with its
    step, loss, tokens/s and ETA from metrics.jsonl."""
    run_dir = sweep_dir / run["run_dir"]
    steps = int(run["steps"])
    out: dict[str, Any] = {"name": run["name"], "kind": run["kind"], "steps": steps, "step": 0, "loss": None,
                           "val_loss": None, "tokens_per_second": None, "eta_seconds": None}
    records = _metrics(run_dir / "metrics.jsonl")
    trains = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("val_loss") is not None]
    if trains:
        last = trains[-1]
        out.update(step=int(last["step"]), loss=last.get("loss"), tokens_per_second=last.get("tokens_per_second"))
        tps = last.get("tokens_per_second")
        per_step = run["config"]["train"]["global_batch_tokens"]
        if tps:
            out["eta_seconds"] = (steps - out["step"]) * per_step / tps
    if evals:
        out["val_loss"] = evals[-1]["val_loss"]
    if _held(run_dir / ".lock"):
        out["state"] = "running"
    elif (run_dir / "final" / "model.safetensors").is_file() and out["step"] >= steps:
        out["state"], out["eta_seconds"] = "done", 0.0
    elif (run_dir / "checkpoints").is_dir():
        out["state"] = "interrupted"
    else:
        out["state"] = "pending"
    return out


def _metrics(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a run killed mid-write
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _held(lock: Path) -> bool:
    """Whether a live process holds this flock (a run directory's .lock, a sweep's lock)."""
    try:
        f = open(lock, "rb")  # read-only: never creates it, and a flock needs no write access
    except OSError:
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        f.close()
    return False


def read_state(sweep_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((sweep_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def status_rows(sweep_dir: Path, doc: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run's progress, with the sweep's record of failures (state.json) applied."""
    doc = doc or read_sweep(sweep_dir)
    state = read_state(sweep_dir)
    rows = []
    for run in doc["runs"]:
        row = run_progress(sweep_dir, run)
        rec = state.get(run["name"], {})
        row["attempts"] = rec.get("attempts", 0)
        if rec.get("failed") and row["state"] != "done":
            row["state"], row["error"] = "failed", rec.get("error", "")
        rows.append(row)
    return rows


def status_table(rows: list[dict[str, Any]]) -> str:
    from scalelab.units import format_duration

    head = ("run", "state", "step", "loss", "val loss", "tokens/s", "ETA")
    body = []
    for r in rows:
        body.append((r["name"], r["state"] + (f" ({r['attempts']} tries)" if r["attempts"] > 1 else ""),
                     f"{r['step']}/{r['steps']}", "" if r["loss"] is None else f"{r['loss']:.4f}",
                     "" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
                     "" if not r["tokens_per_second"] else f"{r['tokens_per_second']:,.0f}",
                     "" if r["eta_seconds"] is None or r["state"] == "done" else format_duration(r["eta_seconds"])))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        if r["state"] == "failed":
            lines.append(f"{r['name']} failed: {r.get('error', '')}")
    return "\n".join(lines)


# ---- the executors -------------------------------------------------------------------------------

def make_executor(kind: str, folder: Path, *, gpus_per_run: int, timeout_min: int, slurm: dict[str, Any],
                  dry_run: bool = False):
    """A submitit executor: LocalExecutor (processes on this machine) or SlurmExecutor (sbatch
    arrays); `dry_run` makes the Slurm one write its sbatch scripts without submitting them."""
    import submitit

    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus_per_run if gpus_per_run > 1 else 0)
        return ex
    cls = _dry_run_class() if dry_run else submitit.SlurmExecutor
    ex = cls(folder=folder)
    ex.update_parameters(time=timeout_min, nodes=1, ntasks_per_node=1,
                         **({"gpus_per_node": gpus_per_run} if gpus_per_run else {}), **slurm)
    return ex


def _dry_run_class():
    import submitit

    class DryRun(submitit.SlurmExecutor):
        """submitit's Slurm executor up to `sbatch`: the submission file is written exactly as it
        would be submitted, and `sbatch` is replaced by an echo of a job id."""
        submitted = 0

        @classmethod
        def affinity(cls) -> int:
            return 1

        def _make_submission_command(self, submission_file_path: Path) -> list[str]:
            DryRun.submitted += 1
            return ["echo", f"Submitted batch job {DryRun.submitted}"]

    return DryRun


def write_slurm_scripts(sweep_dir: Path, *, gpus_per_run: int, timeout_min: int, slurm: dict[str, Any],
                        threads: int) -> list[Path]:
    """--dry-run: submit every unfinished run's job to a Slurm executor that stops before sbatch, and
    copy each sbatch script it wrote to OUT_DIR/slurm/NAME.sbatch."""
    doc = read_sweep(sweep_dir)
    rows = {r["name"]: r for r in status_rows(sweep_dir, doc)}
    ex = make_executor("slurm", sweep_dir / SUBMITIT_DIR / "slurm-dry-run", gpus_per_run=gpus_per_run,
                       timeout_min=timeout_min, slurm=slurm, dry_run=True)
    out = []
    for run in doc["runs"]:
        if rows[run["name"]]["state"] == "done":
            continue
        job = ex.submit(train_one, str(sweep_dir.resolve()), run["name"], gpus_per_run, threads)
        script = sweep_dir / "slurm" / (run["name"].replace("/", "__") + ".sbatch")
        script.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(script, job.paths.submission_file.read_text())
        out.append(script)
    return out


# ---- the loop --------------------------------------------------------------------------------------

def _interrupt_on_sigterm():
    """SIGTERM (a scheduler's or `kill`'s) becomes KeyboardInterrupt, so that `sweep run` cancels its jobs
    as on Ctrl-C; returns the handler it replaced (None off the main thread, where none can be set)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None


def lock_sweep(sweep_dir: Path) -> IO:
    f = open(sweep_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"{sweep_dir} is being run by another `scalelab sweep run`; wait for it or stop it "
                        f"(`scalelab sweep status {sweep_dir}` shows its progress)") from None
    return f


def run_sweep(sweep_dir: Path, *, executor: str = "local", parallel: int = 1, gpus_per_run: int = 1,
              retries: int = 2, timeout_min: int = 7 * 24 * 60, slurm: dict[str, Any] | None = None,
              threads: int = 0, poll_seconds: float = 2.0,
              show: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train every unfinished run, at most `parallel` at once; return the final status rows."""
    doc = read_sweep(sweep_dir)
    runs = runs_by_name(doc)
    lock = lock_sweep(sweep_dir)
    ex = make_executor(executor, sweep_dir / SUBMITIT_DIR, gpus_per_run=gpus_per_run, timeout_min=timeout_min,
                       slurm=slurm or {})
    state = read_state(sweep_dir)
    for rec in state.values():  # a new `sweep run` gives failed runs their tries again
        rec.pop("failed", None)
        rec["attempts"] = 0
    show = show or (lambda text: None)
    in_flight: dict[str, Any] = {}
    shown = ""
    previous = _interrupt_on_sigterm()
    try:
        while True:
            rows = {r["name"]: r for r in status_rows(sweep_dir, doc)}
            for name, job in list(in_flight.items()):
                if not job.done():
                    continue
                del in_flight[name]
                rec = state.setdefault(name, {"attempts": 0})
                try:
                    job.result()
                    rec.pop("error", None)
                except Exception as e:  # the job's traceback, as submitit reports it
                    rec["error"] = _last_line(e) + f" (log: {job.paths.stderr})"
                    if rec["attempts"] > retries:
                        rec["failed"] = True
                atomic_write_text(sweep_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
                rows = {r["name"]: r for r in status_rows(sweep_dir, doc)}
            waiting = []
            for name, run in runs.items():
                rec = state.get(name, {})
                if name in in_flight or rows[name]["state"] == "done" or rec.get("failed"):
                    continue
                parent = run.get("branch_of")
                if parent and rows[parent]["state"] != "done":
                    if state.get(parent, {}).get("failed"):
                        state.setdefault(name, {"attempts": 0}).update(failed=True, error=f"its stable run {parent} failed")
                    else:
                        waiting.append(name)
                    continue
                if len(in_flight) < parallel:
                    rec = state.setdefault(name, {"attempts": 0})
                    rec["attempts"] += 1
                    atomic_write_text(sweep_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
                    in_flight[name] = ex.submit(train_one, str(sweep_dir.resolve()), name, gpus_per_run, threads)
                else:
                    waiting.append(name)
            shown_rows = status_rows(sweep_dir, doc)
            for row in shown_rows:  # submitted, its process not yet holding the run directory
                if row["name"] in in_flight and row["state"] in ("pending", "interrupted"):
                    row["state"] = "starting"
            table = status_table(shown_rows)
            if table != shown:
                show(table)
                shown = table
            if not in_flight and not waiting:
                break
            time.sleep(poll_seconds)
    except BaseException:
        for job in in_flight.values():  # Ctrl-C / SIGTERM: the trainers checkpoint and stop
            job.cancel(check=False)
        for job in in_flight.values():
            _wait(job)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        atomic_write_text(sweep_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
        lock.close()
    return status_rows(sweep_dir, doc)


def _wait(job, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not job.done() and time.monotonic() < end:
        time.sleep(0.5)


def _last_line(e: BaseException) -> str:
    """The exception line of a failed job's traceback (submitit's FailedJobError wraps it between
    dashed rules and follows it with where the logs are)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if any(line.startswith("You can check full logs") for line in lines):
        lines = lines[:next(i for i, line in enumerate(lines) if line.startswith("You can check full logs"))]
    lines = [line for line in lines if set(line) != {"-"}]
    return lines[-1] if lines else type(e).__name__
