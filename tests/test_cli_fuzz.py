"""Hostile input to every verb: bad paths, bad numbers, bad files, a full disk, a read-only mount.

Each case must end the way the CLI convention promises: exit status 2, exactly one line on
stderr (`scalelab VERB: error: ...` or argparse's usage error), no traceback — and every file
that existed before the command is byte-for-byte unchanged afterwards, with nothing
half-written left beside it. The table is the regression list of issue 13's hostile inputs and
their siblings; the hypothesis property drives the arithmetic verbs' numeric flags with random
hostile numbers (answer or refuse, never crash).

count, plan and fit run in-process (the same `main()` the console script calls; they import no
torch and take milliseconds); the other verbs run as subprocesses, as a user runs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS = {"count", "plan", "fit"}

TINY_CONFIG = """
[model]
style = "llama3"
n_layer = 1
n_embd = 32
n_head = 2
num_key_value_heads = 1
vocab_size = 258
block_size = 32

[data]
dir = "{data}"

[train]
seq_len = 16
micro_batch_size = 2
global_batch_tokens = 32
max_steps = 2
dtype = "fp32"

[eval]
every = 0
at_end = false

[checkpoint]
every = 0

[logging]
every = 1
"""


# `sweep design`'s tiny search space for the workspace's byte-level data (vocabulary 258)
SWEEP_SPACE = ("--hidden 32:96:16 --layers 1:3 --head-dims 16 --kv-heads 1 --seq-len 16 --aspect none "
               "--batch-tokens 64 --law shakespeare-cpu --gpus 1 --gpu-type H100")


def _fill(directory: Path) -> None:
    """Fill a tmpfs to the last byte, so the next write fails with ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Pre-existing inputs and outputs that no refused command may touch."""
    ws = tmp_path_factory.mktemp("fuzz")
    text = ws / "corpus.txt"
    text.write_text("".join(f"line {i} of a tiny corpus for hostile tests.\n" for i in range(400)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    py = [sys.executable, "-m", "scalelab"]
    subprocess.run([*py, "prepare", "--input", str(text), "--tokenizer", "byte", "--out", str(ws / "data"),
                    "--no-progress"], check=True, capture_output=True, env=env)
    (ws / "tiny.toml").write_text(TINY_CONFIG.format(data=ws / "data"))
    subprocess.run([*py, "train", str(ws / "tiny.toml"), "--run-dir", str(ws / "run")], check=True,
                   capture_output=True, env=env, cwd=ws)
    shutil.copy(ROOT / "tests" / "data" / "shakespeare_cpu_ladder.csv", ws / "ladder.csv")
    row = "N,D,loss\n"
    (ws / "same_row.csv").write_text(row + "1000000,20000000,3.5\n" * 6)
    (ws / "two_sizes.csv").write_text(row + "".join(f"{n},{d},{3 + 1e3 / n ** 0.3 + 1e3 / d ** 0.3:.6f}\n"
                                                    for n in (1e6, 4e6) for d in (1e7, 3e7, 1e8)))
    (ws / "empty.csv").write_text("")
    (ws / "garbage.csv").write_text("N,D,loss\nabc,1e9,2.5\n")
    (ws / "law.json").write_text('{"existing": "law"}\n')
    (ws / "plan.toml").write_text("# an existing plan\n")
    (ws / "a_file").write_text("a file, not a directory\n")
    (ws / "a_dir").mkdir()
    (ws / "a_dir" / "keep.txt").write_text("keep\n")
    (ws / "garbage.toml").write_text("[model\nnot toml")
    subprocess.run([*py, "sweep", "design", str(ws / "sweep"), "--budgets", "4e8,8e8", "--data", str(ws / "data"),
                    *SWEEP_SPACE.split()], check=True, capture_output=True, env=env)
    bad_hf = ws / "hf_bad"
    bad_hf.mkdir()
    (bad_hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": "abc",
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
        "vocab_size": 258, "max_position_embeddings": 32, "rms_norm_eps": 1e-5}))
    (bad_hf / "model.safetensors").write_bytes(b"not safetensors")
    jitter = ws / "hf_mixtral_jitter"  # training-time router noise: not what our model computes
    jitter.mkdir()
    (jitter / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 258,
        "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.1}))
    return ws


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[str(path.relative_to(root)) + "/"] = "dir"
    return out


# (id, argv with {ws} {ro} {full} {root} placeholders)
CASES = [
    # count
    ("count-overflow", "count gpt2 --set n_layer=1e30"),
    ("count-not-a-number", "count gpt2 --set n_embd=abc"),
    ("count-past-learned-positions", "count gpt2 --seq-len 2048"),
    ("count-unknown-model", "count gpt7"),
    ("count-zero-gpus", "count gpt2 --gpus 0"),
    ("count-nan-tokens", "count gpt2 --tokens nan"),
    ("count-tp-not-dividing-kv-heads", "count llama3.1-8b --gpus 48 --tp 3"),
    ("count-pp-beyond-layers", "count llama3.1-8b --gpus 64 --pp 64"),
    ("count-layout-product-not-gpus", "count llama3.1-8b --gpus 8 --tp 2 --dp-shard 2"),
    ("count-unknown-schedule", "count llama3.1-8b --gpus 8 --pp 2 --pp-schedule Zigzag"),
    ("count-mfu-not-a-fraction", "count llama3.1-8b --gpus 8 --gpu-type H100 --mfu often"),
    ("count-layout-auto-nothing-fits", "count llama3.1-405b --gpus 8 --gpu-type A6000 --layout auto"),
    ("plan-layout-auto-without-gpus", "plan 1e21 --layout auto"),
    ("count-top-k-over-experts", "count mixtral-8x7b --set num_experts_per_tok=99"),
    ("count-mla-field-on-dense", "count llama3.1-8b --set q_lora_rank=1e30"),
    ("count-odd-rope-dim", "count deepseek-v2-lite --set qk_rope_head_dim=7"),
    # sweep fit (a sweep directory's own refusals: tests/test_sweep_fit.py)
    ("sweep-fit-no-such-dir", "sweep fit {ws}/nowhere"),
    ("sweep-fit-not-a-sweep", "sweep fit {ws}/a_dir"),
    ("sweep-fit-a-file", "sweep fit {ws}/a_file"),
    ("sweep-fit-nan-budget", "sweep fit {ws}/a_dir --budget nan"),
    ("sweep-fit-bad-bootstrap", "sweep fit {ws}/a_dir --bootstrap -3"),
    ("sweep-fit-nothing-finished", "sweep fit {ws}/sweep"),
    # plan
    ("plan-degenerate-law", "plan 1e21 --B 1e308 --beta 0.0001"),
    ("plan-negative-budget", "plan -5"),
    ("plan-emit-read-only", "plan 1e19 --emit-config {ro}/plan.toml"),
    ("plan-plot-read-only", "plan 1e19 --plot {ro}/iso.png"),
    ("plan-plot-wrong-suffix", "plan 1e19 --plot {ws}/iso.txt"),
    ("plan-emit-existing-dir", "plan 1e19 --emit-config {ws}/a_dir"),
    ("plan-emit-under-a-file", "plan 1e19 --emit-config {ws}/a_file/plan.toml"),
    ("plan-emit-bad-override", "plan 1e19 --set train.lr=abc --emit-config {ws}/new_plan.toml"),
    ("plan-emit-disk-full", "plan 1e19 --emit-config {full}/plan.toml"),
    # fit
    ("fit-out-existing-dir", "fit {ws}/ladder.csv --out {ws}/a_dir"),
    ("fit-out-read-only", "fit {ws}/ladder.csv --out {ro}/law.json"),
    ("fit-out-disk-full", "fit {ws}/ladder.csv --out {full}/law.json"),
    ("fit-plot-wrong-suffix", "fit {ws}/ladder.csv --plot {ws}/fit.txt"),
    ("fit-negative-tolerance", "fit {ws}/ladder.csv --method isoflop --flop-tolerance -1"),
    ("fit-one-row-six-times", "fit {ws}/same_row.csv --out {ws}/law.json"),
    ("fit-two-sizes", "fit {ws}/two_sizes.csv --out {ws}/law.json"),
    ("fit-empty-csv", "fit {ws}/empty.csv"),
    ("fit-garbage-csv", "fit {ws}/garbage.csv"),
    ("fit-bootstrap-absurd", "fit {ws}/ladder.csv --bootstrap 1000000000"),
    ("fit-missing-input", "fit {ws}/no_such.csv"),
    # tokenizer / prepare / data-info
    ("tokenizer-out-is-a-file", "tokenizer train --input {ws}/corpus.txt --vocab-size 300 --out {ws}/a_file"),
    ("tokenizer-out-existing", "tokenizer train --input {ws}/corpus.txt --vocab-size 300 --out {ws}/a_dir"),
    ("tokenizer-out-read-only", "tokenizer train --input {ws}/corpus.txt --vocab-size 300 --out {ro}/tok"),
    ("prepare-out-is-a-file", "prepare --input {ws}/corpus.txt --tokenizer byte --out {ws}/a_file"),
    ("prepare-out-read-only", "prepare --input {ws}/corpus.txt --tokenizer byte --out {ro}/data"),
    ("prepare-disk-full", "prepare --input {ws}/corpus.txt --tokenizer byte --out {full}/data --no-progress"),
    ("prepare-zero-workers", "prepare --input {ws}/corpus.txt --tokenizer byte --out {ws}/d2 --workers 0"),
    ("prepare-over-data", "prepare --input {ws}/corpus.txt --tokenizer byte --out {ws}/data"),
    ("data-info-missing", "data-info {ws}/no_such_dir"),
    ("data-info-not-data", "data-info {ws}/a_dir"),
    # train
    ("train-run-dir-is-a-file", "train {ws}/tiny.toml --run-dir {ws}/a_file"),
    ("train-run-dir-is-data", "train {ws}/tiny.toml --run-dir {ws}/data"),
    ("train-run-dir-not-a-run", "train {ws}/tiny.toml --run-dir {ws}/a_dir"),
    ("train-run-dir-read-only", "train {ws}/tiny.toml --run-dir {ro}/run"),
    ("train-endless", "train {ws}/tiny.toml --run-dir {ws}/run2 --set train.max_steps=1e30"),
    ("train-huge-depth", "train {ws}/tiny.toml --run-dir {ws}/run2 --set model.n_layer=1000000000000"),
    ("train-huge-vocab", "train {ws}/tiny.toml --run-dir {ws}/run2 --set model.vocab_size=1000000000"),
    ("train-fsdp-without-torchrun", "train {ws}/tiny.toml --run-dir {ws}/run2 --set parallel.strategy=fsdp"),
    ("train-bad-lr", "train {ws}/tiny.toml --run-dir {ws}/run2 --set train.lr=abc"),
    ("train-missing-config", "train {ws}/no_such.toml"),
    ("train-garbage-config", "train {ws}/garbage.toml"),
    ("train-changed-model-on-resume", "train {ws}/tiny.toml --run-dir {ws}/run --set model.n_embd=64"),
    # eval (the workspace's val split is empty: its corpus is one document, which went to train)
    ("eval-nothing-there", "eval {ws}/no_such --data {ws}/data"),
    ("eval-not-a-model", "eval {ws}/a_dir --data {ws}/data --split train"),
    ("eval-bad-hf-model", "eval {ws}/hf_bad --data {ws}/data --split train"),
    ("eval-data-not-data", "eval {ws}/run --data {ws}/a_dir"),
    ("eval-empty-split", "eval {ws}/run --data {ws}/data"),
    ("eval-unknown-split", "eval {ws}/run --data {ws}/data --split test"),
    ("eval-zero-tokens", "eval {ws}/run --data {ws}/data --split train --tokens 0"),
    ("eval-past-positions", "eval {ws}/run --data {ws}/data --split train --seq-len 64"),
    ("eval-plot-wrong-suffix", "eval {ws}/run --data {ws}/data --split train --plot {ws}/loss.txt"),
    ("eval-plot-read-only", "eval {ws}/run --data {ws}/data --split train --plot {ro}/loss.png"),
    ("eval-bad-override", "eval {ws}/run --data {ws}/data --split train --set n_layer=abc"),
    ("eval-rope-scaling-overflows", ("eval {ws}/run --data {ws}/data --split train --seq-len 64 --set "
                                     "rope_scaling={{type=\"yarn\",factor=1e300,original_max_position_embeddings=1e30}}")),
    ("eval-tasks-bad-device", ("eval {ws}/run --tasks {root}/tests/data/lm_eval_tasks/scalelab_tiny_mc.yaml "
                               "--limit 1 --device foo")),
    # sample / plot / export / import / demo
    ("sample-nan-temperature", "sample {ws}/run --temperature nan --max-new-tokens 4"),
    ("sample-no-cuda", "sample {ws}/run --device cuda --max-new-tokens 4"),
    ("sample-nothing-there", "sample {ws}/a_dir"),
    ("plot-out-existing-dir", "plot {ws}/run --out {ws}/a_dir"),
    ("plot-out-wrong-suffix", "plot {ws}/run --out {ws}/curve.txt"),
    ("plot-out-read-only", "plot {ws}/run --out {ro}/curve.png"),
    ("import-hf-bad-config", "import-hf {ws}/hf_bad {ws}/imported"),
    ("import-hf-not-hf", "import-hf {ws}/a_dir {ws}/imported"),
    ("export-hf-out-is-a-file", "export-hf {ws}/run {ws}/a_file"),
    ("export-hf-dense-as-moe", "export-hf {ws}/run {ws}/hf_out --arch mixtral"),
    ("import-hf-router-noise", "import-hf {ws}/hf_mixtral_jitter {ws}/imported"),
    ("train-top-k-over-experts", "train {ws}/tiny.toml --run-dir {ws}/run2 --set model.n_routed_experts=2 "
                                 "--set model.num_experts_per_tok=3"),
    ("export-hf-out-read-only", "export-hf {ws}/run {ro}/hf"),
    ("demo-out-is-a-file", "demo --out {ws}/a_file"),
    ("demo-out-read-only", "demo --out {ro}/demo"),
    ("demo-negative-budget", "demo --out {ws}/demo --budget -1"),
    # sweep
    ("sweep-budgets-out-of-order", "sweep design {ws}/sw2 --budgets 8e8,4e8 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-budgets-repeated", "sweep design {ws}/sw2 --budgets 4e8,4e8 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-budget-too-small", "sweep design {ws}/sw2 --budgets 1e3,1e4 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-budget-nan", "sweep design {ws}/sw2 --budgets nan,1e9 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-missing-data", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/no_such " + SWEEP_SPACE),
    ("sweep-data-not-data", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/a_dir " + SWEEP_SPACE),
    ("sweep-other-design", "sweep design {ws}/sweep --budgets 4e8,1.6e9 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-design-over-a-dir", "sweep design {ws}/a_dir --budgets 4e8,8e8 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-design-over-a-file", "sweep design {ws}/a_file --budgets 4e8,8e8 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-design-read-only", "sweep design {ro}/sw --budgets 4e8,8e8 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-design-disk-full", "sweep design {full}/sw --budgets 4e8,8e8 --data {ws}/data " + SWEEP_SPACE),
    ("sweep-design-owned-set", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/data --set train.lr=1 "
     + SWEEP_SPACE),
    ("sweep-design-bad-set", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/data --set eval.batches=abc "
     + SWEEP_SPACE),
    ("sweep-design-one-point", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/data --points 1 " + SWEEP_SPACE),
    ("sweep-design-bad-compare", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/data --compare ffn_type "
     + SWEEP_SPACE),
    ("sweep-design-bad-hparams", "sweep design {ws}/sw2 --budgets 4e8,8e8 --data {ws}/data --hparams width:x "
     + SWEEP_SPACE),
    ("sweep-run-not-a-sweep", "sweep run {ws}/a_dir"),
    ("sweep-run-bad-executor", "sweep run {ws}/sweep --executor pbs"),
    ("sweep-run-zero-parallel", "sweep run {ws}/sweep --parallel 0"),
    ("sweep-run-batch-does-not-split", "sweep run {ws}/sweep --gpus-per-run 3"),
    ("sweep-run-dry-run-local", "sweep run {ws}/sweep --dry-run"),
    ("sweep-run-bad-slurm-key", "sweep run {ws}/sweep --executor slurm --dry-run --slurm no_such_key=1"),
    ("sweep-status-missing", "sweep status {ws}/no_such"),
    ("sweep-verify-without-fit", "sweep verify {ws}/sweep"),
]


def run_verb(argv: list[str], cwd: Path) -> tuple[int, str]:
    """(exit status, stderr) of `scalelab ARGV`, in-process for the torch-free verbs."""
    if argv[0] in IN_PROCESS:
        from scalelab.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(cwd):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = int(e.code or 0)
        return rc, err.getvalue()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", SCALELAB_CACHE=str(cwd / "cache"))
    r = subprocess.run([sys.executable, "-m", "scalelab", *argv], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120, stdin=subprocess.DEVNULL)
    return r.returncode, r.stderr


def assert_one_line_refusal(rc: int, stderr: str, verb: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert rc == 2, f"exit {rc}, expected 2; stderr:\n{stderr}"
    errors = [line for line in lines if line.startswith("scalelab") and "error:" in line]
    assert len(errors) == 1, f"expected one error line, got:\n{stderr}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(case, workspace, readonly_dir, tiny_fs):
    _fill(tiny_fs)
    _, template = case
    argv = template.format(ws=workspace, ro=readonly_dir, full=tiny_fs, root=ROOT).split()
    before, full_before = _tree_digest(workspace), _tree_digest(tiny_fs)
    rc, stderr = run_verb(argv, workspace)
    assert_one_line_refusal(rc, stderr, argv[0])
    after = _tree_digest(workspace)
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"pre-existing files changed: {sorted(changed)}"
    added = sorted(set(after) - set(before) - {"cache/"} - {k for k in after if k.startswith("cache/")})
    assert not added, f"left behind: {added}"
    assert _tree_digest(tiny_fs) == full_before


HOSTILE_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e308", "1e-308", "1e30", "abc", "",
                                   "-0", "3.5", "1e400", "0x10", "12T", "-12T"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from([
    ("count", "gpt2", "--seq-len"), ("count", "gpt2", "--gpus"), ("count", "gpt2", "--tokens"),
    ("count", "gpt2", "--mfu"), ("count", "gpt2", "--micro-batch"), ("count", "gpt2", "--loss-chunk-tokens"),
    ("count", "llama3.2-1b", "--set n_layer="),
    ("count", "gpt2", "--tp"), ("count", "gpt2", "--pp"), ("count", "gpt2", "--dp-shard"),
    ("count", "gpt2", "--pp-microbatches"), ("count", "gpt2", "--global-batch-tokens"),
    ("count", "llama3.2-1b", "--set n_head="), ("count", "llama3.2-1b", "--set rope_theta="),
    ("count", "llama3.2-1b", "--set norm_eps="), ("count", "llama3.2-1b", "--set vocab_size="),
    ("plan", "1e19", "--E"), ("plan", "1e19", "--A"), ("plan", "1e19", "--alpha"), ("plan", "1e19", "--beta"),
    ("plan", "1e19", "--max-params"), ("plan", "1e19", "--max-tokens"), ("plan", "1e19", "--mfu"),
    ("plan", "", "budget"),
]), value=HOSTILE_NUMBERS)
def test_arithmetic_verbs_answer_or_refuse_any_number(flag, value, tmp_path):
    verb, positional, option = flag
    if option == "budget":
        argv = [verb, value] if value else [verb, "--", ""]
    elif option.startswith("--set "):
        argv = [verb, positional, "--set", option.split()[1] + value]
    else:
        argv = [verb, positional, option, value] if positional else [verb, option, value]
    rc, stderr = run_verb(argv, tmp_path)
    assert "Traceback" not in stderr
    assert rc in (0, 2), (argv, rc, stderr)
    if rc == 2:
        assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr
