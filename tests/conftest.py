"""Shared fixtures: the synthetic dataset and the tiny model, built once into the project's cache."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import inputs  # noqa: E402
import model as modellib  # noqa: E402
import sources  # noqa: E402
from tiny import build_tiny, make_synthetic  # noqa: E402


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


@pytest.fixture(scope="session")
def modality_split(dataset_root):
    return data.split_by_image(sources.load_omnimedvqa(dataset_root, question_types=["Modality Recognition"]))


@pytest.fixture
def single_process_group():
    """A one-process gloo group, as `python train.py` makes, for code that calls torch.distributed."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
