"""Qwen2.5-VL and Qwen3-VL: their published configs, shrunk, load, train and evaluate like Qwen2-VL.

Each family is its real config.json with only the sizes made small (and the
tiny model's tokenizer), random weights, and a folder laid out like the
published one. The sampler and log-probs oracles in test_model.py run on both
through its any_model fixture; this file checks loading, the image budget and
train.py / eval.py end to end.
"""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import data
import inputs
import model as modellib
import sampler
import sources
import train
from test_train import SMALL, metrics, run
from tiny import CHAT_TEMPLATE

# ---------------------------------------------------------------- the published files

# Qwen/Qwen3-VL-2B-Instruct's config.json. Its layout, switches and token ids are the
# Qwen3-VL-4B-Instruct config.json vendored verbatim in public code (transformers 4.57.0.dev0),
# with the 2B sizes (text 2048 wide, 28 layers, 16 heads, 8 key-value heads, MLP 6144; vision
# out_hidden_size 2048) as public code pins them for the 2B at revision 89644892e4d8.
QWEN3_VL_2B_INSTRUCT = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                         "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}
# Qwen/Qwen2.5-VL-3B-Instruct's config.json, verbatim from a public dump of the model's
# files (the flat pre-4.49 layout: the language model's keys at the top level).
QWEN2_5_VL_3B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
# Their preprocessor_config.json files: Qwen3-VL gives its pixel budget as "size" (256 x 256 to
# 4096 x 4096 pixels) and normalises to [-1, 1]; Qwen2.5-VL as min/max_pixels with CLIP's mean.
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN2_5_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
# Their generation_config.json token ids: both end a completion at <|im_end|> or <|endoftext|>.
GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643]}
# The special tokens behind those ids, the same in every Qwen2-VL, 2.5-VL and 3-VL tokenizer.
QWEN_TOKENS = {151643: "<|endoftext|>", 151645: "<|im_end|>", 151652: "<|vision_start|>",
               151653: "<|vision_end|>", 151654: "<|vision_pad|>", 151655: "<|image_pad|>",
               151656: "<|video_pad|>"}


@dataclass
class Family:
    """A published model's files, and the sizes that make it a toy (same keys, smaller values)."""

    folder_name: str  # the published repository's name
    weight_name: str  # one key of its model.safetensors.index.json
    config: dict  # config.json
    preprocessor: dict  # preprocessor_config.json
    sizes: dict  # replaces these keys of config.json
    pixels: dict  # replaces the pixel budget in preprocessor_config.json


FAMILIES = {
    "qwen2.5-vl": Family(
        "Qwen2.5-VL-3B-Instruct", "visual.merger.mlp.0.weight", QWEN2_5_VL_3B_INSTRUCT,
        QWEN2_5_VL_PREPROCESSOR,
        sizes={
            # head_dim 16: 8 rotary frequencies split 2:3:3 over (time, height, width), as 16:24:24.
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [2, 3, 3]},
            # Full attention in every other block (the 3B: every 8th), windows in the rest.
            "vision_config": {"depth": 4, "hidden_size": 32, "intermediate_size": 64,
                              "num_heads": 2, "out_hidden_size": 64,
                              "fullatt_block_indexes": [1, 3]},
        },
        pixels={"min_pixels": 28 * 28, "max_pixels": 64 * 64}),
    "qwen3-vl": Family(
        "Qwen3-VL-2B-Instruct", "model.visual.deepstack_merger_list.0.linear_fc1.weight",
        QWEN3_VL_2B_INSTRUCT, QWEN3_VL_PREPROCESSOR,
        sizes={
            # head_dim 32: 16 rotary frequencies interleaved 6:5:5 over (time, height, width).
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                            "rope_scaling": {"mrope_section": [6, 5, 5]}},
            # Three deepstack levels from inside the tower (not its last block), as in the 2B,
            # so they feed the first three decoder layers.
            "vision_config": {"depth": 4, "hidden_size": 32, "intermediate_size": 64,
                              "num_heads": 2, "out_hidden_size": 64,
                              "deepstack_visual_indexes": [0, 1, 2]},
        },
        pixels={"size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}}),
}


def replaced(config: dict, changes: dict) -> dict:
    """A copy of a nested config with the given keys replaced (nested dicts are merged)."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        config[key] = replaced(config[key], value) if isinstance(value, dict) else value
    return config


def retokenized(config, tokenizer):
    """The config with every Qwen token id (and the vocabulary size) mapped to the tokenizer's."""
    if not isinstance(config, dict):
        return config
    mapped = {}
    for key, value in config.items():
        if key.endswith("token_id") and value is not None:
            ids = [value] if isinstance(value, int) else value
            ids = tokenizer.convert_tokens_to_ids([QWEN_TOKENS[i] for i in ids])
            value = ids[0] if isinstance(value, int) else ids
        elif key == "vocab_size":
            value = len(tokenizer)
        mapped[key] = retokenized(value, tokenizer)
    return mapped


def toy_config(family: Family, tokenizer) -> dict:
    """The published config.json at toy size, for the tiny model's tokenizer."""
    return retokenized(replaced(family.config, family.sizes), tokenizer)


def random_model(name: str, tokenizer):
    """The family's architecture at toy size, randomly initialised (seed 1), fp32, in eval mode."""
    torch.manual_seed(1)
    config = AutoConfig.for_model(**toy_config(FAMILIES[name], tokenizer))
    # fp32 as load_model gives it, not the config's bf16.
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def write_processor(folder, name: str, tokenizer) -> None:
    """Tokenizer files, chat_template.json and preprocessor_config.json (toy pixel budget)."""
    family = FAMILIES[name]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    # Both ship their template in chat_template.json, not in tokenizer_config.json. This is the
    # tiny model's (Qwen2-VL's), whose image placeholder theirs share.
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    preprocessor = replaced(family.preprocessor, family.pixels)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


def toy_processor(folder, name: str, tokenizer) -> inputs.Processor:
    """The family's processor (Qwen3-VL: 16-pixel patches) at the toy pixel budget."""
    write_processor(folder, name, tokenizer)
    return inputs.Processor.from_pretrained(folder)


def write_model_folder(folder, name: str, model, tokenizer) -> None:
    """A folder laid out like the published one: sharded safetensors with their index (under the
    published weight names, which save_pretrained writes), config.json and generation_config.json
    in the published layout, the processor's files."""
    model.save_pretrained(folder, max_shard_size="100KB")
    # save_pretrained writes transformers' current layout; the published files are older.
    (folder / "config.json").write_text(json.dumps(toy_config(FAMILIES[name], tokenizer), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(retokenized(GENERATION, tokenizer)))
    write_processor(folder, name, tokenizer)


# ---------------------------------------------------------------- tests


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
def test_toy_config_differs_from_the_published_one_only_in_sizes_and_token_ids(tiny, name):
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
def test_the_image_budget_is_really_applied(tiny, tmp_path, name, expected):
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
def test_folder_laid_out_like_the_published_one_loads(tiny, dataset_root, tmp_path, name):
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
def test_freeze_projector_freezes_every_merger_into_the_language_model(tiny, tmp_path, name,
                                                                       single_process_group):
    """--freeze_projector: the patch merger's parameters, and Qwen3-VL's deepstack mergers',
    stop training; the rest of the vision tower trains on."""
    _, processor = tiny
    folder = tmp_path / FAMILIES[name].folder_name
    write_model_folder(folder, name, random_model(name, processor.tokenizer), processor.tokenizer)
    cfg = train.resolve(train.Config(model=str(folder), freeze_projector=True, beta=0.0), world=1)
    policy, _ = train.load_models(cfg, str(folder), torch.device("cpu"))
    visual = policy.model.visual
    mergers = [n for n, m in visual.named_modules() if type(m).__name__.endswith("PatchMerger")]
    assert len(mergers) == 1 + len(getattr(visual.config, "deepstack_visual_indexes", []))
    for parameter, value in visual.named_parameters():
        in_merger = any(parameter.startswith(merger + ".") for merger in mergers)
        assert value.requires_grad != in_merger, parameter


@pytest.mark.parametrize("name", FAMILIES)
def test_train_and_eval_run_end_to_end(tiny, tmp_path, name):
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
