"""Shared fixtures: the synthetic dataset and the tiny model, built once into the project's
cache, and the models and questions several test files run on."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen2VLForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import inputs  # noqa: E402
import model as modellib  # noqa: E402
import sources  # noqa: E402
from families import random_model, toy_processor  # noqa: E402
from tiny import build_tiny, make_synthetic, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def dataset_root():
    """The same synthetic dataset `python train.py` uses (built on first use)."""
    return make_synthetic(REPO / ".cache" / "synthetic-omnimedvqa")


@pytest.fixture(scope="session")
def tiny_path(dataset_root):
    """The same tiny model `python train.py` uses (built on first use, about a minute)."""
    return build_tiny(REPO / ".cache" / "tiny-qwen2-vl", dataset_root)


@pytest.fixture
def tiny(tiny_path):
    """A fresh fp32 copy of the tiny model and its processor."""
    torch.manual_seed(0)
    return modellib.load_model(tiny_path), inputs.Processor.from_pretrained(tiny_path)


@pytest.fixture(params=["tiny-warmed-up", "qwen2-vl-random", "qwen2.5-vl-random",
                        "qwen3-vl-random"])
def any_model(request, tiny, tmp_path):
    """The warmed-up tiny model, and random ones whose outputs depend on every input detail:
    Qwen2-VL at the tiny size, Qwen2.5-VL and Qwen3-VL from their published configs shrunk
    (families.py), each with its own processor (Qwen3-VL: 16-pixel patches)."""
    model, processor = tiny
    torch.manual_seed(1)
    if request.param == "qwen2-vl-random":
        model = Qwen2VLForConditionalGeneration(tiny_config(processor.tokenizer)).eval()
    elif request.param != "tiny-warmed-up":
        family = request.param.removesuffix("-random")
        model = random_model(family, processor.tokenizer)
        processor = toy_processor(tmp_path / family, family, processor.tokenizer)
    return model, processor


@pytest.fixture(scope="session")
def modality_split(dataset_root):
    return data.split_by_image(sources.load_omnimedvqa(dataset_root,
                                                       question_types=["Modality Recognition"]))


@pytest.fixture(scope="module")
def mixed_samples(dataset_root):
    """Three questions of different types (so different text lengths)."""
    samples = sources.load_omnimedvqa(dataset_root)
    return [next(s for s in samples if s["question_type"] == q)
            for q in sources.QUESTION_TYPES[:3]]


@pytest.fixture
def single_process_group():
    """A one-process gloo group, as `python train.py` makes, for code that calls
    torch.distributed."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
