"""bench_gpu.sh's dry run: the GPU benchmark's stages on the tiny model on the CPU.

Every stage must leave a JSON record in $OUT/bench_gpu.jsonl, printed as it is
written, with finite numbers where it measured something, the graph decoder's
compile time apart from its time per token; a budget too small for a stage
skips it and says so. No time is asserted: speed claims live in bench.py's
output (STYLE), and the dry run's CPU numbers say nothing about a GPU.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ["cuda_tests", "decode", "step", "trl", "lora", "logprob_gap"]


def dry_run(out: Path, *flags: str) -> tuple[list[str], list[dict]]:
    """`./bench_gpu.sh dry-run FLAGS` with OUT set: the lines it printed, the records it wrote."""
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench_gpu.sh"), "dry-run", *flags], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (out / "bench_gpu.jsonl").read_text().splitlines()
    return done.stdout.splitlines(), [json.loads(line) for line in lines]


def positive(record: dict, *keys: str) -> bool:
    return all(math.isfinite(record[key]) and record[key] > 0 for key in keys)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("out"))


def test_every_stage_runs_in_order_and_each_record_is_printed_as_written(full_run):
    printed, records = full_run
    assert list(dict.fromkeys(r["stage"] for r in records)) == ["setup", *STAGES]
    assert not [r for r in records if {"failed", "stopped"} & r.keys()]
    assert all(json.dumps(r) in printed for r in records)
    setup = records[0]
    assert setup["config"]["budget_s"] == 480 and setup["torch"] == torch.__version__
    assert all(positive(r, "seconds") for r in records[1:])
    # The tables come last, from the same records.
    assert any(line.startswith("| ours, graph decoder |") for line in printed)


def test_each_stage_records_what_it_measured(full_run):
    _, records = full_run
    of = {stage: [r for r in records if r["stage"] == stage] for stage in STAGES}
    # Without CUDA the one test that needs it is skipped, and so counted.
    expected = {"passed": 1} if torch.cuda.is_available() else {"skipped": 1}
    assert [(r["exit_code"], r["tests"]) for r in of["cuda_tests"]] == [(0, expected)]
    bandwidth, *decode = of["decode"]
    assert positive(bandwidth, "bandwidth_gbs")
    assert [(r["decoder"], r["rows"]) for r in decode] == [
        ("dynamic", 2), ("graph", 2), ("dynamic", 4), ("graph", 4)]
    assert all(positive(r, "bound_ms", "gb_read") for r in decode)
    # ms is the difference of a 4-token and a 1-token rollout: on a busy CPU noise can outweigh
    # 3 tokens of the tiny model, so only its being a number is asserted here.
    assert all(math.isfinite(r["ms"]) for r in decode)
    # The graph decoder's first rollout compiles: that time is its own field, not in ms.
    assert [positive(r, "compile_s") for r in decode if r["decoder"] == "graph"] == [True, True]
    assert not [r for r in decode if r["decoder"] != "graph" and "compile_s" in r]
    assert [(r["decoder"], r["lora_rank"]) for r in of["step"]] == [("dynamic", 0), ("graph", 0)]
    assert [(r["decoder"], r["lora_rank"]) for r in of["lora"]] == [("dynamic", 16)]
    steps = of["step"] + of["lora"]
    assert all(positive(r, "step_s", "first_step_s", "tokens_per_s", "peak_mb") for r in steps)
    [trl] = of["trl"]
    if "skipped" in trl:  # TRL, the benchmark-only extra, is not installed
        assert trl["skipped"].startswith("TRL cannot be imported")
    else:
        assert positive(trl, "step_s", "tokens_per_s", "peak_mb")
    # In fp32 the sampler's log-probs are the training forward's (test_decoders: to 1e-5).
    assert [r["decoder"] for r in of["logprob_gap"]] == ["dynamic", "graph"]
    assert all(0 <= r["max_gap"] < 1e-4 and r["clipped"] == 0 for r in of["logprob_gap"])


def test_a_tiny_budget_stops_the_first_stage_and_skips_the_later_ones_saying_which(tmp_path):
    printed, records = dry_run(tmp_path, "--budget_s", "1")
    [first] = [r for r in records if r["stage"] == "cuda_tests"]
    assert first["stopped"] == "budget"
    for stage in STAGES[1:]:
        assert f"skipped (budget): {stage}" in printed
        assert [r for r in records if r["stage"] == stage] == [{"stage": stage,
                                                                "skipped": "budget"}]
