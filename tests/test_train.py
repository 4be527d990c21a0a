"""The training and evaluation scripts end to end: one process against two, and learning at all."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

import train

SMALL = ["--prompts_per_step", "4", "--num_generations", "4", "--max_new_tokens", "12", "--eval_every", "0",
         "--eval_size", "8"]


def run(args: list[str], nproc: int = 1) -> str:
    """Run a script of the project as a user would, with python or torchrun; return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    done = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tiny_path, tmp_path):
    """Same prompts, same samples, same losses and weights: FSDP2 over gloo changes nothing."""
    # lr 1e-4: Adam turns rounding noise in near-zero gradients into steps of up to
    # lr size, so a smaller lr keeps that noise under 1e-5 while a real difference
    # in the gradients (a wrong image, a group split over ranks) still shows.
    for nproc in (1, 2):
        run(["train.py", "--steps", "3", "--lr", "1e-4", "--output_dir", str(tmp_path / f"ranks{nproc}"), *SMALL],
            nproc)
    one, two = metrics(tmp_path / "ranks1"), metrics(tmp_path / "ranks2")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"] and a["completion_len"] == b["completion_len"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    weights_one = load_file(tmp_path / "ranks1" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "ranks2" / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5)
    # The updates really moved the weights, by far more than the tolerance.
    base = load_file(tiny_path / "model.safetensors")
    assert max((base[name] - weights_one[name]).abs().max().item() for name in base) > 1e-4


def test_evaluation_is_the_same_on_two_ranks_and_any_batch_size(tiny_path, tmp_path):
    results = []
    for nproc, batch_size in [(1, 64), (2, 8), (2, 5)]:
        run(["eval.py", "--checkpoint", str(tiny_path), "--max_samples", "37", "--batch_size", str(batch_size)], nproc)
        results.append(json.loads((tiny_path / "eval_results.json").read_text()))
    assert results[0]["questions"] == 37
    assert results[0] == results[1] == results[2]


def test_a_few_dozen_grpo_steps_raise_the_reward(tiny_path, tmp_path):
    """On CT questions alone the right letter is always A: the base picks it a quarter of the time."""
    run(["train.py", "--steps", "30", "--modalities", "CT", "--output_dir", str(tmp_path), "--eval_every", "0",
         "--eval_size", "8"])
    accuracy = [m["reward_accuracy"] for m in metrics(tmp_path)]
    first, last = sum(accuracy[:5]) / 5, sum(accuracy[-5:]) / 5
    assert first < 0.5 and last > first + 0.3, (first, last)


def test_unknown_flag_is_refused_with_the_list_of_flags():
    with pytest.raises(SystemExit, match="unknown flag '--lr_rate'.*--lr "):
        train.parse_args(train.Config, ["--lr_rate", "1"])


def test_flag_with_a_bad_value_is_refused():
    with pytest.raises(SystemExit, match="--steps wants a int, got 'ten'"):
        train.parse_args(train.Config, ["--steps", "ten"])


def test_prompts_must_split_evenly_over_ranks():
    with pytest.raises(SystemExit, match="multiple of the 3 ranks"):
        train.resolve(train.Config(prompts_per_step=4), world=3)
