"""From files to model inputs: images decoded and converted, the processor that tokenizes
chat text and encodes images, and the batch of prompts the model takes.

Shapes: B prompts, P prompt tokens, I images (a prompt may have several),
D = channels x temporal patch x patch x patch.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


# ---------------------------------------------------------------- images


def load_image(path: str, size: int | None = None) -> Image.Image:
    """An RGB image, resized to size x size when size is given (Med-R1 resizes to 384x384).

    16-bit and float grayscale (common in medical PNG/TIFF) are scaled to 8 bits
    by their own range; palette, CMYK, RGBA and the rest convert as PIL does.
    """
    with Image.open(path) as image:
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            pixels = np.asarray(image, dtype=np.float64)
            # Scaled by the finite pixels' range; NaN and infinite pixels become black.
            finite = pixels[np.isfinite(pixels)]
            low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
            scaled = np.nan_to_num((pixels - low) / max(high - low, 1e-12), nan=0.0, posinf=1.0,
                                   neginf=0.0)
            image = Image.fromarray(np.uint8(255 * scaled.clip(0, 1)))
        image = image.convert("RGB")
    return image.resize((size, size), Image.BICUBIC) if size else image


# ---------------------------------------------------------------- processor

# The placeholder of one image in a chat text; the processor repeats it once per visual token.
IMAGE_PAD = "<|image_pad|>"


@dataclass
class Processor:
    """Image-only stand-in for Qwen2VLProcessor, whose video half needs torchvision here."""

    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil

    @classmethod
    def from_pretrained(cls, path, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> "Processor":
        path = Path(path)
        if not (path / "preprocessor_config.json").exists() or not list(path.glob("tokenizer*")):
            raise FileNotFoundError(f"{path} has no processor files (preprocessor_config.json, "
                                    "tokenizer.json): "
                                    "copy them from the base model folder")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.chat_template is None and (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
            tokenizer.chat_template = template
        pixel_limits = {k: v for k, v in [("min_pixels", min_pixels), ("max_pixels", max_pixels)]
                        if v}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **pixel_limits)
        return cls(tokenizer, image_processor)

    def __call__(self, texts: list[str], images: list) -> dict:
        """Tokenize B chat texts (left-padded) and encode their I images, given in the order of
        the texts' <|image_pad|> placeholders (one per image)."""
        counts = [text.count(IMAGE_PAD) for text in texts]
        if sum(counts) != len(images):
            raise ValueError(f"{len(images)} images for {sum(counts)} image placeholders")
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        # Each image becomes grid_t * grid_h * grid_w / merge^2 <|image_pad|> tokens, in order.
        pads = iter((vision["image_grid_thw"].prod(dim=-1) // merge).tolist())  # (I,)
        texts = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(pads), text)
                 for text in texts]
        tokens = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        image_token = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        return {
            "input_ids": tokens["input_ids"],  # (B, P)
            "attention_mask": tokens["attention_mask"],  # (B, P)
            "mm_token_type_ids": (tokens["input_ids"] == image_token).long(),  # (B, P)
            "pixel_values": vision["pixel_values"],  # (patches, D)
            "image_grid_thw": vision["image_grid_thw"],  # (I, 3)
            "image_counts": torch.tensor(counts),  # (B,)
        }

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def visual_tokens(processor: Processor, image_size: int | None) -> int:
    """How many <|image_pad|> tokens an image_size x image_size image becomes (Med-R1's 384: 196).

    Run once at start-up so the log shows the image budget the processor really applies.
    """
    from PIL import Image

    image = Image.new("RGB", (image_size or 448, image_size or 448))
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


@dataclass
class PromptBatch:
    """B prompts ready for the model; prompts are left-padded to a common length P."""

    input_ids: torch.Tensor  # (B, P)
    attention_mask: torch.Tensor  # (B, P), 0 on left padding
    mm_token_type_ids: torch.Tensor  # (B, P), 1 on image tokens
    pixel_values: torch.Tensor  # (sum over images of patches, D)
    image_grid_thw: torch.Tensor  # (I, 3), the images of prompt 0, then of prompt 1, ...
    image_counts: torch.Tensor  # (B,), how many images each prompt has

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward (and generate)."""
        return {k: v for k, v in vars(self).items() if k != "image_counts"}

    def to(self, device) -> "PromptBatch":
        return PromptBatch(**{k: v.to(device) for k, v in vars(self).items()})


def select_rows(batch: PromptBatch, rows: torch.Tensor) -> PromptBatch:
    """The given rows of a batch (in that order, repeats allowed), each with its images."""
    # The images of each row: row b's are numbers first[b] to first[b] + image_counts[b] - 1.
    first = batch.image_counts.cumsum(0) - batch.image_counts  # (B,)
    images = torch.cat([torch.arange(first[r], first[r] + batch.image_counts[r])
                        for r in rows.tolist()])  # (images of the R rows,)
    # One (patches, D) block per image.
    blocks = batch.pixel_values.split(batch.image_grid_thw.prod(dim=-1).tolist())
    return PromptBatch(
        input_ids=batch.input_ids[rows],  # (R, P)
        attention_mask=batch.attention_mask[rows],  # (R, P)
        mm_token_type_ids=batch.mm_token_type_ids[rows],  # (R, P)
        pixel_values=torch.cat([blocks[i] for i in images.tolist()]),  # (their patches, D)
        image_grid_thw=batch.image_grid_thw[images],  # (images of the R rows, 3)
        image_counts=batch.image_counts[rows],  # (R,)
    )
