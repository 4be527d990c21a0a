"""Qwen2.5-VL and Qwen3-VL: their published configs, shrunk, load, train and evaluate like Qwen2-VL.

The families themselves are in families.py. The sampler and log-probs oracles in
test_model.py run on both through the any_model fixture; this file checks loading,
the image budget and train.py / eval.py end to end.
"""

import json

import pytest
import torch
from transformers import AutoConfig

import data
import inputs
import model as modellib
import sampler
import sources
import train
from families import FAMILIES, random_model, toy_config, write_model_folder, write_processor
from helpers import SMALL, metrics, run
from tiny import CHAT_TEMPLATE


def flat(config: dict, prefix: str = "") -> dict:
    """{"vision_config.depth": 24, ...}: every leaf of a nested config by its dotted path."""
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[prefix + key] = value
    return items


@pytest.mark.parametrize("name", FAMILIES)
def test_a_toy_config_changes_only_sizes_and_token_ids(tiny, name):
    _, processor = tiny
    family = FAMILIES[name]
    published, toy = flat(family.config), flat(toy_config(family, processor.tokenizer))
    assert toy.keys() == published.keys()
    changed = {key for key in published if toy[key] != published[key]}
    allowed = set(flat(family.sizes)) | {k for k in published
                                         if k.endswith(("token_id", "vocab_size"))}
    assert changed <= allowed, changed - allowed
    # The switches the toy must exercise, read back through transformers.
    config = AutoConfig.for_model(**toy_config(family, processor.tokenizer))
    assert config.tie_word_embeddings
    if name == "qwen3-vl":
        assert config.vision_config.patch_size == 16
        assert config.text_config.rope_parameters["mrope_interleaved"]
        # Every deepstack level comes from inside the tower and reaches a decoder layer.
        deepstack = config.vision_config.deepstack_visual_indexes
        assert max(deepstack) < config.vision_config.depth - 1
        assert len(deepstack) <= config.text_config.num_hidden_layers
    else:
        # Some blocks attend within 112-pixel windows, the others to the whole image.
        assert config.vision_config.window_size == 112
        assert 0 < len(config.vision_config.fullatt_block_indexes) < config.vision_config.depth


@pytest.mark.parametrize("name, expected", [("qwen2.5-vl", 196), ("qwen3-vl", 144)])
def test_each_familys_pixel_budget_is_applied(tiny, tmp_path, name, expected):
    """384 x 384 with max_pixels 401408, by smart_resize's rule (each side rounded to a multiple
    of patch x merge; the area is within the budget, so nothing shrinks):
    Qwen2.5-VL: 384 / 28 = 13.7 -> 14 -> 392 pixels, (392 / 28)^2 = 14 x 14 = 196 tokens.
    Qwen3-VL:   384 / 32 = 12 -> 384 pixels, (384 / 32)^2 = 12 x 12 = 144 tokens.
    """
    _, processor = tiny
    folder = tmp_path / FAMILIES[name].folder_name
    write_processor(folder, name, processor.tokenizer)
    # The published budget, not the toy one.
    (folder / "preprocessor_config.json").write_text(json.dumps(FAMILIES[name].preprocessor))
    loaded = inputs.Processor.from_pretrained(folder, max_pixels=401408)
    assert inputs.visual_tokens(loaded, 384) == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_a_published_style_folder_loads(tiny, dataset_root, tmp_path, name):
    """Published config.json layout, sharded safetensors, chat_template.json, the published
    preprocessor keys: the same model, tokenizer and processor come back."""
    _, processor = tiny
    model = random_model(name, processor.tokenizer)
    folder = tmp_path / FAMILIES[name].folder_name
    write_model_folder(folder, name, model, processor.tokenizer)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert FAMILIES[name].weight_name in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1

    loaded = modellib.load_model(folder)
    loaded_processor = inputs.Processor.from_pretrained(folder)
    assert type(loaded) is type(model)
    assert loaded_processor.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded_processor.image_processor.patch_size == FAMILIES[name].preprocessor["patch_size"]
    assert sampler.end_token_ids(loaded, loaded_processor.tokenizer) == sorted(
        loaded_processor.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    samples = sources.load_omnimedvqa(dataset_root)[:3]
    batch = data.collate(samples, loaded_processor, "think-after")
    assert batch.image_grid_thw.tolist() == [[1, 4, 4]] * 3  # 56 x 56 -> 2 x 2 visual tokens
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch.model_inputs()).logits,
                                   model(**batch.model_inputs()).logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_freeze_projector_freezes_every_merger(tiny, tmp_path, name, single_process_group):
    """--freeze_projector: the patch merger's parameters, and Qwen3-VL's deepstack mergers',
    stop training; the rest of the vision tower trains on."""
    _, processor = tiny
    folder = tmp_path / FAMILIES[name].folder_name
    write_model_folder(folder, name, random_model(name, processor.tokenizer), processor.tokenizer)
    cfg = train.resolve(train.Config(model=str(folder), freeze_projector=True, beta=0.0), world=1)
    policy, _ = modellib.load_models(cfg, str(folder), torch.device("cpu"))
    visual = policy.model.visual
    mergers = [n for n, m in visual.named_modules() if type(m).__name__.endswith("PatchMerger")]
    assert len(mergers) == 1 + len(getattr(visual.config, "deepstack_visual_indexes", []))
    for parameter, value in visual.named_parameters():
        in_merger = any(parameter.startswith(merger + ".") for merger in mergers)
        assert value.requires_grad != in_merger, parameter


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_runs_end_to_end(tiny, tmp_path, name):
    """The published layout -> train.py --algo sft -> 2 GRPO steps -> eval.py, as a user runs them.

    The supervised warm-up is there because a random model scores 0 on every
    completion: all advantages, and so GRPO's gradient, would be 0. After it
    the model writes <answer>X</answer> (no-think's layout) some of the time,
    with some letter, so the rewards differ within groups.
    """
    _, processor = tiny
    base = tmp_path / FAMILIES[name].folder_name
    write_model_folder(base, name, random_model(name, processor.tokenizer), processor.tokenizer)
    mode = ["--prompt_mode", "no-think"]
    run(["train.py", "--model", str(base), "--algo", "sft", "--steps", "60", "--lr", "3e-3",
         "--prompts_per_step", "8", "--eval_every", "0", "--eval_size", "8",
         "--output_dir", str(tmp_path / "sft"), *mode])
    warm = tmp_path / "sft" / "final"
    run(["train.py", "--model", str(warm), "--steps", "2", "--lr", "1e-4",
         "--output_dir", str(tmp_path / "grpo"), *SMALL, *mode])
    final = tmp_path / "grpo" / "final"

    assert min(m["zero_std_groups"] for m in metrics(tmp_path / "grpo")) < 1  # a real gradient
    before, after = modellib.load_model(warm), modellib.load_model(final)
    published_type = FAMILIES[name].config["model_type"]
    assert before.config.model_type == after.config.model_type == published_type
    changes = [(a - b).abs().max().item()
               for a, b in zip(after.state_dict().values(), before.state_dict().values())]
    assert max(changes) > 1e-5
    run(["eval.py", "--checkpoints", str(final), "--max_samples", "2",
         "--output", str(tmp_path / "eval")])
    (results,) = json.loads((tmp_path / "eval" / "eval_results.json").read_text()).values()
    assert results["overall"]["questions"] == 8 * 2
