"""LoRA: the reference is the base model with the adapters off, and PEFT is the oracle for the
format (it reads our adapters, we read its)."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import lora
import model as modellib
import train
from conftest import REPO
from helpers import SMALL, run

peft = pytest.importorskip("peft")  # in the test install (README); not a training dependency


def logprobs(model, processor, samples, completion_ids):
    """token_logprobs of fixed completions (N = 2 per prompt)."""
    prompts = data.collate(samples, processor, "think-after")
    mask = torch.ones_like(completion_ids)
    with torch.no_grad():
        return modellib.token_logprobs(model, prompts, completion_ids, mask, group_size=2)


@pytest.fixture
def completions(modality_split):
    samples = modality_split[0][:2]
    return samples, torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))


def test_the_reference_is_the_policy_with_adapters_off(tiny_path, tiny, completions,
                                                       single_process_group):
    base, processor = tiny
    cfg = train.resolve(train.Config(lora_rank=4, beta=0.04), world=1)
    policy, reference = modellib.load_models(cfg, tiny_path, torch.device("cpu"))
    assert reference is policy  # no second copy
    assert all(".lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():  # adapters that change the model, as after training
        for module in policy.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_B.weight.normal_(0, 0.05)
    samples, ids = completions
    expected = logprobs(base, processor, samples, ids)
    with lora.adapters_off(reference):
        torch.testing.assert_close(logprobs(reference, processor, samples, ids), expected,
                                   rtol=0, atol=1e-5)
    assert (logprobs(policy, processor, samples, ids) - expected).abs().max() > 1e-2


@pytest.fixture(scope="module")
def lora_run(tiny_path, tmp_path_factory):
    """A 2-step LoRA run (lr 1e-2: the adapters really move) that keeps a checkpoint per step."""
    folder = tmp_path_factory.mktemp("lora-run")
    run(["train.py", "--steps", "2", "--lr", "1e-2", "--lora_rank", "4", "--save_every", "1",
         *SMALL, "--output_dir", str(folder)])
    return folder


def peft_logprobs(tiny_path, adapter, processor, samples, ids):
    """The oracle: PEFT's model from the base and an adapter folder."""
    theirs = peft.PeftModel.from_pretrained(modellib.load_model(tiny_path), adapter)
    return logprobs(theirs.base_model.model, processor, samples, ids)


def test_peft_reads_the_adapters_we_train(lora_run, tiny_path, tiny, completions):
    _, processor = tiny
    samples, ids = completions
    final = lora_run / "final"
    # eval.py reads the adapter folder's training config (its prompt mode) and data.
    for name in ("train_config.json", "training_data.json"):
        assert (final / "adapter" / name).read_text() == (final / name).read_text()
    ours = modellib.load_model(final / "adapter")
    expected = peft_logprobs(tiny_path, final / "adapter", processor, samples, ids)
    torch.testing.assert_close(logprobs(ours, processor, samples, ids), expected,
                               rtol=0, atol=1e-5)


def test_the_merged_export_is_the_adapted_model(lora_run, tiny_path, tiny, completions):
    """A plain model folder (from_pretrained, no adapters) beside the adapter."""
    base, processor = tiny
    samples, ids = completions
    final = lora_run / "final"
    expected = peft_logprobs(tiny_path, final / "adapter", processor, samples, ids)
    merged = modellib.load_model(final)
    torch.testing.assert_close(logprobs(merged, processor, samples, ids), expected,
                               rtol=0, atol=1e-4)
    assert (logprobs(base, processor, samples, ids) - expected).abs().max() > 1e-3
    # Only the language model's targeted linears changed.
    before = load_file(tiny_path / "model.safetensors")
    after = load_file(final / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("proj.weight")) and "visual" not in k for k in changed)


def test_we_read_an_adapter_peft_saved(tiny_path, tiny, completions, tmp_path):
    """Made by PEFT on two targets only."""
    _, processor = tiny
    samples, ids = completions
    made = peft.get_peft_model(modellib.load_model(tiny_path), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in made.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    made.save_pretrained(tmp_path / "peft")
    expected = logprobs(made.base_model.model, processor, samples, ids)
    ours = modellib.load_model(tmp_path / "peft")
    torch.testing.assert_close(logprobs(ours, processor, samples, ids), expected,
                               rtol=0, atol=1e-5)


def test_eval_takes_an_adapter_folder(lora_run, tmp_path):
    out = run(["eval.py", "--checkpoints", f"{lora_run / 'step-1'}", "--max_samples", "4",
               "--max_new_tokens", "8", "--output", str(tmp_path / "eval")])
    assert "accuracy" in out and (tmp_path / "eval" / "eval_results.json").exists()


def test_an_adapter_that_misses_targets_is_named(lora_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "final" / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0." not in k},
              adapter / "adapter_model.safetensors")
    with pytest.raises(SystemExit, match="does not fit this model's targets, e.g. .*layers.0"):
        modellib.load_model(adapter)


@pytest.mark.parametrize("frozen", ["vision_tower", "projector"])
def test_only_the_frozen_part_stays_put(tiny_path, tmp_path, frozen):
    run(["train.py", "--steps", "2", "--lr", "1e-2", f"--freeze_{frozen}", "true", *SMALL,
         "--output_dir", str(tmp_path)])
    before = load_file(tiny_path / "model.safetensors")
    after = load_file(tmp_path / "final" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    parts = {"vision_tower": {k for k in before if "visual" in k and "merger" not in k},
             "projector": {k for k in before if "merger" in k}}
    assert not moved & parts[frozen]
    assert all(moved & part for part in [*parts.values(), {k for k in before if "visual" not in k}]
               if part is not parts[frozen])


def test_lora_refuses_a_refreshed_reference():
    stopped = subprocess.run([sys.executable, "train.py", "--lora_rank", "4",
                              "--ref_sync_every", "2"], cwd=REPO, capture_output=True, text=True)
    assert stopped.returncode != 0
    assert "--ref_sync_every needs a reference of its own" in stopped.stderr
