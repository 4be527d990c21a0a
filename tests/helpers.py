"""Plain helpers the test files share: running the scripts, reading their logs, building inputs."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from conftest import REPO

import data
import inputs

# A small GRPO step for runs end to end: 4 prompts x 4 samples of up to 12 tokens, no evaluation.
SMALL = ["--prompts_per_step", "4", "--num_generations", "4", "--max_new_tokens", "12",
         "--eval_every", "0", "--eval_size", "8"]

# Images of different shapes give different numbers of image tokens, hence left padding. The
# 28 x 140 one is taller than Qwen2.5-VL's 112-pixel attention window, so it is split in two.
SIZES = {"equal": [(56, 56), (56, 56)], "different": [(56, 56), (84, 28), (28, 140)]}


def run(args: list[str], nproc: int = 1) -> str:
    """Run a script of the project as a user would, with python or torchrun; return its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc)]
    done = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def run_fail(args: list[str]) -> str:
    """Run a script that must fail; return what it printed."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    return done.stdout + done.stderr


def metrics(folder) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def png(size=(40, 30), color=(200, 10, 10)) -> bytes:
    """A plain image's PNG bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_medr1_split(path: Path, samples: list[dict], root: Path) -> None:
    """samples written as a Med-R1 split file (image, problem, solution), each image relative to
    root."""
    records = [{"image": str(Path(s["images"][0]).relative_to(root.resolve())),
                "problem": data.problem_text(s), "solution": f"<answer> {s['answer']} </answer>"}
               for s in samples]
    path.write_text(json.dumps(records))


def encode(processor, samples, sizes, mode="think-after") -> inputs.PromptBatch:
    """A left-padded PromptBatch whose i-th image is resized to sizes[i] (width, height)."""
    texts = [processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": data.build_prompt(s, mode)}]}],
        add_generation_prompt=True, tokenize=False) for s in samples]
    images = [inputs.load_image(s["images"][0]).resize(size) for s, size in zip(samples, sizes)]
    return inputs.PromptBatch(**processor(texts, images))


def repeat_prompts(batch: inputs.PromptBatch, group_size: int) -> inputs.PromptBatch:
    """B prompts -> B*G rows where row i is prompt i // G, each with its own copy of its
    image's patches."""
    rows = torch.arange(batch.input_ids.shape[0]).repeat_interleave(group_size)
    return inputs.select_rows(batch, rows)
