"""Qwen2.5-VL and Qwen3-VL as published, shrunk to toys: their config.json files, the sizes
that make them small, and folders laid out like the published ones.

Each family is its real config.json with only the sizes made small (and the tiny
model's tokenizer), random weights, and a folder laid out like the published one.
"""

import copy
import json
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import inputs
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
