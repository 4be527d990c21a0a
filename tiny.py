"""The embedded default: a tiny Qwen2-VL and a synthetic OmniMedVQA, both built offline, once.

Not the real pipeline: it exists so that `python train.py` runs and learns on a
CPU with nothing downloaded, and so that the tests have a real-architecture
model and data in the real layout. data.py and model.py read the real files;
this file only writes files in the same layouts.
"""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import data
import inputs
import model as modellib
import rewards
import sampler
import sources
from common import print0

# The synthetic data's default task: the tiny model learns it in minutes.
QUESTION_TYPE = "Modality Recognition"
# Asked only of images with a lesion.
QUESTION_TYPES_OF_A_LESION = ("Lesion Grading", "Other Biological Attributes")


def filters(data_dir: str, modalities: str, question_types: str) -> tuple[list, list]:
    """The comma-separated filters as lists; the synthetic data defaults to QUESTION_TYPE."""
    question_types = question_types or ("" if data_dir else QUESTION_TYPE)
    return [m for m in modalities.split(",") if m], [q for q in question_types.split(",") if q]


def dataset_root(data_dir: str, cache_dir: str) -> str:
    """--data, or the synthetic dataset in cache_dir, written once by rank 0."""
    if data_dir:
        return data_dir
    root = Path(cache_dir) / "synthetic-omnimedvqa"
    if dist.get_rank() == 0:
        make_synthetic(root)
    dist.barrier()
    return str(root)


def model_path(model: str, cache_dir: str, root: str) -> str:
    """--model, or the tiny model in cache_dir, built once by rank 0 (about a minute)."""
    if model:
        return model
    folder = Path(cache_dir) / "tiny-qwen2-vl"
    if dist.get_rank() == 0 and not folder.exists():
        print0(f"building the tiny model in {folder} (once)")
        build_tiny(folder, root)
    dist.barrier()
    return str(folder)


# ---------------------------------------------------------------- the tiny model

# Qwen2-VL's special tokens and chat template, as its tokenizer ships them.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def warmup_target(sample: dict, mode: str, rng: random.Random) -> str:
    """A completion in the mode's format with a uniformly random letter: format, no knowledge."""
    letter = rng.choice(list(sample["options"]))
    reason = rng.choice(["The image shows it.", "This is what the image looks like.",
                         "It fits the findings."])
    return rewards.MODES[mode].example.format(letter=letter, reason=reason)


def train_tokenizer(samples: list[dict]) -> PreTrainedTokenizerFast:
    """A small byte-level BPE over the prompts and answer formats, and Qwen2-VL's special tokens."""
    corpus = [data.build_prompt(s, mode) for s in samples for mode in rewards.TRAINING_MODES]
    corpus += [warmup_target(s, mode, random.Random(i)) for i, s in enumerate(samples)
               for mode in rewards.TRAINING_MODES]
    corpus += ["system\nYou are a helpful assistant."] * len(samples)
    bpe = Tokenizer(models.BPE())
    # Merges may cross word boundaries (use_regex=False), so the fixed prompt
    # template becomes a few long tokens: short prompts make the tiny run fast.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, max_token_length=16, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer):
    """The real Qwen2-VL architecture at toy size (about 0.6 M parameters)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            # head_dim 32 -> 16 rotary frequencies split over (time, height, width).
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny(folder, dataset_root, warmup_steps: int = 300, seed: int = 0) -> Path:
    """Build the embedded default once: its tokenizer, a random Qwen2-VL, a format-only warm-up.

    The warm-up is supervised on targets with the right tags and a uniformly
    random letter, for every prompt mode and question type, so the base follows
    the format but sits at chance: only the GRPO reward can teach the task.
    """
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(seed)
    rng = random.Random(seed)
    samples, _ = data.split_by_image(sources.load_omnimedvqa(dataset_root))
    # max_pixels 64 * 64, not 56 * 56: smart_resize floors, so any square image then becomes
    # 56 x 56 pixels, 4 x 4 patches, 4 visual tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=64 * 64)
    processor = inputs.Processor(train_tokenizer(samples), image_processor)
    model = Qwen2VLForConditionalGeneration(tiny_config(processor.tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(warmup_steps):
        batch_samples, mode = rng.sample(samples, 32), rng.choice(rewards.TRAINING_MODES)
        prompts = data.collate(batch_samples, processor, mode)
        targets = [warmup_target(s, mode, rng) for s in batch_samples]
        nll, count = modellib.sft_nll(model, processor.tokenizer, prompts, targets)
        loss = nll / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config.eos_token_id = sampler.end_token_ids(model, processor.tokenizer)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    tmp = new_build_folder(folder)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    publish(tmp, folder, "model.safetensors")
    return folder


# ---------------------------------------------------------------- synthetic data
# Eight procedural "modalities", each with its own colour and layout, and
# image attributes that answer the other four question types. The attributes
# are drawn at random; the letters follow from them, so nothing in the
# question text gives the answer away.

ANSWER_POOLS = {
    "Modality Recognition": list(sources.MODALITIES),
    "Anatomy Identification": ["Brain", "Chest", "Abdomen", "Knee"],
    "Disease Diagnosis": ["No", "Yes"],
    "Lesion Grading": ["Grade I", "Grade II", "Grade III"],
    "Other Biological Attributes": ["Left", "Right"],
}
QUESTIONS = {
    "Modality Recognition": "What imaging modality was used to capture this image?",
    "Anatomy Identification": "Which part of the body is shown in this image?",
    "Disease Diagnosis": "Is there any abnormality in this image?",
    "Lesion Grading": "What is the grade of the lesion in this image?",
    "Other Biological Attributes": "On which side is the finding in this image?",
}
# (background RGB, foreground RGB, texture) per modality, in MODALITIES order.
LOOKS = [
    ((10, 10, 10), (200, 200, 200), "ring"),      # CT
    ((40, 0, 60), (200, 140, 255), "blobs"),      # MRI
    ((0, 0, 50), (230, 240, 255), "bars"),        # X-Ray
    ((30, 20, 0), (200, 170, 90), "fan"),         # Ultrasound
    ((230, 180, 150), (110, 60, 30), "disc"),     # Dermoscopy
    ((20, 0, 0), (240, 110, 30), "disc"),         # Fundus Photography
    ((0, 40, 40), (90, 220, 220), "layers"),      # OCT
    ((240, 190, 230), (120, 40, 150), "dots"),    # Microscopy
]


def draw_image(modality_index: int, anatomy: int, lesion_grade: int, side: int,
               rng: np.random.Generator, size: int) -> Image.Image:
    """A procedural image: modality sets colour and texture, anatomy the body, a lesion a spot."""
    background, foreground, texture = LOOKS[modality_index]
    y, x = np.mgrid[0:size, 0:size] / size  # (S, S) each, in [0, 1)
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
    # Body outline: circle, wide ellipse, tall ellipse or square by anatomy.
    ry, rx = [(0.35, 0.35), (0.28, 0.42), (0.42, 0.28), (0.33, 0.33)][anatomy]
    if anatomy == 3:
        body = (abs(y - cy) < ry) & (abs(x - cx) < rx)
    else:
        body = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
    pattern = {
        "ring": np.abs(np.hypot(y - cy, x - cx) - 0.25) < 0.06,
        "blobs": np.sin(12 * x + rng.uniform(0, 6)) * np.sin(12 * y) > 0.2,
        "bars": (np.sin(20 * x + rng.uniform(0, 6)) > 0.3),
        "fan": (np.abs(x - 0.5) < y * 0.6) & (rng.random((size, size)) > 0.4),
        "disc": np.ones_like(x, dtype=bool),
        "layers": np.sin(25 * y + rng.uniform(0, 6)) > 0,
        "dots": rng.random((size, size)) > 0.85,
    }[texture]
    weight = (body & pattern)[..., None] * rng.uniform(0.7, 1.0)  # (S, S, 1)
    pixels = np.array(background) * (1 - weight) + np.array(foreground) * weight  # (S, S, 3)
    if lesion_grade > 0:
        # A bright lesion on the left or right half; its radius grows with the grade.
        ly, lx = cy + rng.uniform(-0.1, 0.1), cx + (-0.18 if side == 0 else 0.18)
        lesion = np.hypot(y - ly, x - lx) < 0.04 + 0.03 * lesion_grade
        pixels[lesion] = (255, 255, 0)
    pixels = pixels + rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def synthetic_options(question_type: str, truth: int, rng: random.Random,
                      fixed_order: bool) -> list[str]:
    """The option texts for one question whose answer is ANSWER_POOLS[question_type][truth]."""
    pool = ANSWER_POOLS[question_type]
    if question_type == "Modality Recognition":
        if fixed_order:
            # The half of the modality list that holds the answer, in list order: the
            # letter depends only on the image, which makes the task learnable fast.
            return pool[truth // 4 * 4:truth // 4 * 4 + 4]
        options = rng.sample([name for name in pool if name != pool[truth]], 3) + [pool[truth]]
    else:
        options = list(pool)
    if not fixed_order:
        rng.shuffle(options)
    return options


def make_synthetic(root, images_per_modality: int = 200, image_size: int = 56, seed: int = 0,
                   fixed_order: bool = True) -> Path:
    """Write a synthetic dataset in OmniMedVQA's layout under root (idempotent) and return root.

    Every image gets one question of each of the 5 types; 2-4 options per
    question. With fixed_order the options of a question type always come in
    the same order (see synthetic_options); otherwise they are shuffled.
    """
    root = Path(root)
    if (root / ".complete").exists():
        return root
    tmp = new_build_folder(root)
    rng = np.random.default_rng(seed)
    option_rng = random.Random(seed)
    qa_dir = tmp / "QA_information" / "Open-access"
    qa_dir.mkdir(parents=True, exist_ok=True)
    for m, (name, modality_type) in enumerate(sources.MODALITIES.items()):
        dataset = f"Synthetic {name}"
        (tmp / "Images" / dataset).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(images_per_modality):
            anatomy, grade, side = int(rng.integers(4)), int(rng.integers(4)), int(rng.integers(2))
            image_path = f"Images/{dataset}/{i:05d}.png"
            draw_image(m, anatomy, grade, side, rng, image_size).save(tmp / image_path)
            # Per question type, the index of the answer in ANSWER_POOLS.
            truths = [m, anatomy, int(grade > 0), grade - 1, side]
            for q, (question_type, truth) in enumerate(zip(sources.QUESTION_TYPES, truths)):
                # No lesion: nothing to grade or locate.
                if grade == 0 and question_type in QUESTION_TYPES_OF_A_LESION:
                    continue
                options = synthetic_options(question_type, truth, option_rng, fixed_order)
                record = {
                    "dataset": dataset,
                    "question_id": f"{dataset}_{i:05d}_{q}",
                    "question_type": question_type,
                    "question": QUESTIONS[question_type],
                    "gt_answer": ANSWER_POOLS[question_type][truth],
                    "image_path": image_path,
                    "modality_type": modality_type,
                }
                record.update({f"option_{L}": text for L, text in zip(sources.LETTERS, options)})
                records.append(record)
        (qa_dir / f"{dataset}.json").write_text(json.dumps(records, indent=1))
    (tmp / ".complete").touch()
    publish(tmp, root, ".complete")
    return root


def new_build_folder(folder: Path) -> Path:
    """A fresh folder beside folder to build it in: two processes building it at once (two runs
    started together on an empty cache) never write into the same files."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))


def publish(tmp: Path, folder: Path, marker: str) -> None:
    """Move a finished build into place whole; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, folder)  # only onto a missing or empty folder
    except OSError:
        shutil.rmtree(tmp)
    if not (folder / marker).exists():
        raise RuntimeError(f"{folder} exists but holds no complete build ({marker} is missing): "
                           "remove it and run again")
