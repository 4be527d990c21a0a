"""Everything that touches the network: loading, the tiny default, FSDP2, sampling, log-probs, saving.

Shapes: B prompts, G samples per prompt, N = B*G rows, P prompt tokens,
T completion tokens, V vocabulary.
"""

import functools
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForImageTextToText, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import data

# Qwen2-VL's special tokens and chat template, as its tokenizer ships them.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The policy must never sample these: a stray <|image_pad|> breaks the training forward.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- processor


@dataclass
class Processor:
    """Image-only stand-in for Qwen2VLProcessor, whose video half needs torchvision in transformers 5."""

    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil

    @classmethod
    def from_pretrained(cls, path, min_pixels: int | None = None, max_pixels: int | None = None) -> "Processor":
        path = Path(path)
        if not (path / "preprocessor_config.json").exists() or not list(path.glob("tokenizer*")):
            raise FileNotFoundError(f"{path} has no processor files (preprocessor_config.json, tokenizer.json): "
                                    "copy them from the base model folder")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.chat_template is None and (path / "chat_template.json").exists():
            tokenizer.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        pixel_limits = {k: v for k, v in [("min_pixels", min_pixels), ("max_pixels", max_pixels)] if v}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **pixel_limits)
        return cls(tokenizer, image_processor)

    def __call__(self, texts: list[str], images: list) -> dict:
        """Tokenize B chat texts (one image placeholder each, left-padded) and encode their B images."""
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        # Each image becomes grid_t * grid_h * grid_w / merge^2 <|image_pad|> tokens.
        pads = (vision["image_grid_thw"].prod(dim=-1) // merge).tolist()  # (B,)
        texts = [text.replace("<|image_pad|>", "<|image_pad|>" * n) for text, n in zip(texts, pads)]
        tokens = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return {
            "input_ids": tokens["input_ids"],  # (B, P)
            "attention_mask": tokens["attention_mask"],  # (B, P)
            "mm_token_type_ids": (tokens["input_ids"] == image_token).long(),  # (B, P)
            "pixel_values": vision["pixel_values"],  # (patches, D)
            "image_grid_thw": vision["image_grid_thw"],  # (B, 3)
        }

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: <|im_end|>, <|endoftext|> and the generation config's eos."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def visual_tokens(processor: Processor, image_size: int | None) -> int:
    """How many <|image_pad|> tokens one image of image_size x image_size becomes (Med-R1's 384: 196).

    Run once at start-up so the log shows the image budget the processor really applies.
    """
    from PIL import Image

    image = Image.new("RGB", (image_size or 448, image_size or 448))
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


def load_model(path, dtype=torch.float32):
    """A Qwen2-VL or Qwen2.5-VL model from a local Hugging Face folder; nothing is downloaded."""
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)


# ---------------------------------------------------------------- the embedded tiny default


def warmup_target(sample: dict, mode: str, rng: random.Random) -> str:
    """A completion in the mode's format with a uniformly random letter: format without knowledge."""
    letter = rng.choice(list(sample["options"]))
    reason = rng.choice(["The image shows it.", "This is what the image looks like.", "It fits the findings."])
    return {
        "think-after": f"<answer>{letter}</answer><think>{reason}</think>",
        "think-before": f"<think>{reason}</think><answer>{letter}</answer>",
        "no-think": f"<answer>{letter}</answer>",
    }[mode]


def train_tokenizer(samples: list[dict]) -> PreTrainedTokenizerFast:
    """A small byte-level BPE over the prompts and answer formats, plus Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [data.build_prompt(s, mode) for s in samples for mode in data.PROMPTS]
    corpus += [warmup_target(s, mode, random.Random(i)) for i, s in enumerate(samples) for mode in data.PROMPTS]
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
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer):
    """The real Qwen2-VL architecture at toy size (about 0.6 M parameters)."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            # head_dim 32 -> 16 rotary frequencies split over (time, height, width).
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny(folder, dataset_root, warmup_steps: int = 300, seed: int = 0) -> Path:
    """Build the embedded default once and cache it: tokenizer, random Qwen2-VL, format-only warm-up.

    The warm-up is supervised on targets with the right tags and a uniformly
    random letter, for every prompt mode and question type, so the base follows
    the format but sits at chance: only the GRPO reward can teach the task.
    """
    from transformers import Qwen2VLForConditionalGeneration

    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(seed)
    rng = random.Random(seed)
    samples, _ = data.split_by_image(data.load_omnimedvqa(dataset_root))
    # max_pixels 64 * 64, not 56 * 56: smart_resize floors, so any square image then becomes
    # 56 x 56 pixels, 4 x 4 patches, 4 visual tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=64 * 64)
    processor = Processor(train_tokenizer(samples), image_processor)
    model = Qwen2VLForConditionalGeneration(tiny_config(processor.tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(warmup_steps):
        batch_samples, mode = rng.sample(samples, 32), rng.choice(list(data.PROMPTS))
        prompts = data.collate(batch_samples, processor, mode)
        loss = sft_loss(model, processor.tokenizer, prompts, [warmup_target(s, mode, rng) for s in batch_samples])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config.eos_token_id = end_token_ids(model, processor.tokenizer)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------- distributed


def shard(model, bf16: bool, hybrid: bool = False) -> None:
    """FSDP2: the vision tower as one unit, each decoder layer as one, then the root.

    bf16 keeps fp32 master weights and reduces gradients in fp32. hybrid shards
    within a node and replicates across nodes (a 2-D device mesh, torchrun's
    LOCAL_WORLD_SIZE ranks per node): parameter all-gathers stay on the node's
    fast links, only the gradient all-reduce crosses nodes.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    mesh = None
    if hybrid:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu",
                                (dist.get_world_size() // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.model.visual, mp_policy=policy, mesh=mesh)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mp_policy=policy, mesh=mesh)
    fully_shard(model, mp_policy=policy, mesh=mesh)


def gathered_once(function):
    """Under FSDP2, each unit's parameters are gathered at its first forward in
    the call and kept until the call returns, not gathered and freed again at
    every one of the decode loop's forwards."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]  # the root keeps its own
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            return function(model, *args, **kwargs)
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()
    return wrapper


# ---------------------------------------------------------------- sampling and log-probs


@dataclass
class Rollout:
    """N = B*G sampled completions; row i belongs to prompt i // G."""

    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T), 1 up to and including the end token
    logprobs: torch.Tensor  # (N, T), fp32, at the sampling temperature
    entropy: torch.Tensor  # (N, T), of the tempered next-token distribution
    truncated: torch.Tensor  # (N,), True if the length limit came before an end token


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts, end token and padding removed. Rewards score text, never token ids."""
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def prompt_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw) -> torch.Tensor:
    """Qwen2-VL's 3-D rope positions (3, B, L): image tokens get (time, row, column), text counts on."""
    positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return positions


@torch.no_grad()
@gathered_once
def sample(model, prompts: data.PromptBatch, group_size: int, max_new_tokens: int, end_ids: list[int],
           banned_ids: list[int], temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
           stop=None, compile_decode: bool = False) -> Rollout:
    """G completions per prompt from one prefill per prompt; temperature 0 is greedy.

    The prompt and its image are encoded once, then the KV cache is repeated G
    times. Rows that ended leave the decode batch (once at least half of it has
    ended, so the cache is copied a few times, not every token). Under
    torch.distributed every rank keeps decoding until every row of every rank
    has ended, so FSDP's collectives stay in step.

    Each token is drawn by inverse-CDF sampling with one uniform number per row.
    rows = (first row of this rank, rows on all ranks): every rank draws the
    numbers for all rows from the same CPU generator and keeps its own, so the
    completions do not depend on how the prompts are split over ranks.
    stop(tokens (N, t)) -> (N,) bool may end rows early (e.g. at "</answer>").
    compile_decode runs the one-token decode forward through torch.compile.
    """
    G, device = group_size, prompts.input_ids.device
    decode_step = torch.compile(model, dynamic=True) if compile_decode else model
    positions = prompt_positions(model, prompts.input_ids, prompts.attention_mask, prompts.mm_token_type_ids,
                                 prompts.image_grid_thw)  # (3, B, P)
    out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, position_ids=positions,
                pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                mm_token_type_ids=prompts.mm_token_type_ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)  # every tensor in the cache: (B, ...) -> (N, ...)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # (N, V)
    N = logits.shape[0]
    # The decode batch holds the rows `active` (n of the N); the cache, logits,
    # attention mask and positions below have one row per active row.
    active = torch.arange(N, device=device)  # (n,)
    # Text after the prompt counts on from the prompt's largest position, whatever the padding.
    next_position = positions.amax(dim=(0, 2)).repeat_interleave(G) + 1  # (n,)
    attention_mask = prompts.attention_mask.repeat_interleave(G, dim=0)  # (n, P)
    filler = end_ids[0] if end_ids else 0  # what rows that ended emit (masked out)
    end_ids = torch.tensor(end_ids, dtype=torch.long, device=device)
    banned_ids = torch.tensor(banned_ids, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    tokens, logprobs, masks, entropies = [], [], [], []

    def to_all_rows(values, fill):
        """(n,) values of the active rows -> (N,), fill for rows no longer in the batch."""
        return torch.full((N,), fill, dtype=values.dtype, device=device).index_copy(0, active, values)

    for t in range(max_new_tokens):
        scaled = logits / (temperature if temperature > 0 else 1.0)  # (n, V)
        allowed = scaled.index_fill(1, banned_ids, float("-inf"))  # (n, V), vision tokens never drawn
        if temperature > 0:
            first, total = rows or (0, N)
            uniform = torch.rand(total, generator=generator)[first:first + N].to(device)[active]  # (n,)
            cdf = top_p_filter(top_k_filter(allowed, top_k), top_p).softmax(dim=-1).cumsum(dim=-1)  # (n, V)
            # The first token whose cumulative probability exceeds u; tokens of
            # probability 0 (banned, filtered) can never be that token.
            token = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)  # (n,)
        else:
            token = allowed.argmax(dim=-1)  # (n,)
        # The log-prob under the model's full tempered distribution, which is what
        # the training forward computes; the ban, top-k and top-p only choose the token.
        all_logprobs = scaled.log_softmax(dim=-1)  # (n, V)
        step_token = torch.where(finished, filler, to_all_rows(token, filler))  # (N,), ended rows emit padding
        tokens.append(step_token)
        logprobs.append(to_all_rows(all_logprobs.gather(1, token[:, None]).squeeze(1), 0.0))  # (N,)
        entropies.append(to_all_rows(-(all_logprobs.exp() * all_logprobs).sum(dim=-1), 0.0))  # (N,)
        masks.append(~finished)
        finished = finished | torch.isin(step_token, end_ids)
        if stop is not None:
            finished = finished | stop(torch.stack(tokens, dim=1))
        # The one host synchronization per token: how many active rows go on, and whether all ranks are done.
        going_on = ~finished[active]  # (n,)
        done = (~going_on).all().int()
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        left, done = torch.stack([going_on.sum(), done]).tolist()
        if done or t == max_new_tokens - 1:
            break
        if 0 < left <= len(active) // 2:  # drop the ended rows (never all: the forward must still run)
            keep = going_on.nonzero().squeeze(1)  # (left,)
            cache.batch_select_indices(keep)
            active, next_position, attention_mask = active[keep], next_position[keep], attention_mask[keep]
        n = len(active)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)  # (n, P + t + 1)
        position = (next_position + t).view(1, n, 1).expand(3, n, 1)  # (3, n, 1)
        out = decode_step(input_ids=step_token[active, None], attention_mask=attention_mask, position_ids=position,
                          past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()  # (n, V)
    mask = torch.stack(masks, dim=1)  # (N, T)
    return Rollout(
        completion_ids=torch.stack(tokens, dim=1),  # (N, T)
        completion_mask=mask.long(),  # (N, T)
        logprobs=torch.stack(logprobs, dim=1) * mask,  # (N, T), 0 after the end
        entropy=torch.stack(entropies, dim=1) * mask,  # (N, T), 0 after the end
        truncated=~finished,  # (N,)
    )


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (N, V)
    # Drop a token when the tokens before it already reach top_p (the first one always stays).
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p  # (N, V)
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (and any tied with the k-th); 0 keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


class PromptCache(DynamicCache):
    """A KV cache that stops growing once frozen: the completion tokens attend to
    the prompt's keys and values without adding their own, so a checkpointed
    decoder layer, replayed in the backward pass, sees exactly what it saw."""

    frozen = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def token_logprobs(model, prompts: data.PromptBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                   temperature: float = 1.0, group_size: int = 1) -> torch.Tensor:
    """log pi(completion token t | prompt, tokens < t), fp32, at the sampling temperature: (N, T).

    Completion row i belongs to prompt row i // group_size. As in sample(), each
    prompt and its image are encoded once and the KV cache is repeated G times;
    the completions then run on top of it, and the gradient flows back through
    the shared cache. So a group costs P + G*T tokens, not G*(P + T). Logits are
    made only for completion positions. With gradient checkpointing enabled
    (enable_grad_checkpointing) the completion pass keeps only each decoder
    layer's input and recomputes the rest in the backward pass.
    """
    G, T = group_size, completion_ids.shape[1]
    positions = prompt_positions(model, prompts.input_ids, prompts.attention_mask, prompts.mm_token_type_ids,
                                 prompts.image_grid_thw)  # (3, B, P)
    cache = PromptCache()
    prefill = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, position_ids=positions,
                    pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                    mm_token_type_ids=prompts.mm_token_type_ids, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    # Next-token shift: the prompt's last logit predicts completion token 0, completion
    # token t predicts token t + 1, and the last completion token predicts nothing.
    first = prefill.logits[:, -1:].repeat_interleave(G, dim=0)  # (N, 1, V)
    logprobs = [chosen_logprobs(first, completion_ids[:, :1], temperature)]  # (N, 1)
    if T > 1:
        cache.batch_repeat_interleave(G)  # (B, ...) -> (N, ...), differentiable
        cache.frozen = True
        attention_mask = torch.cat([prompts.attention_mask.repeat_interleave(G, dim=0), completion_mask[:, :-1]],
                                   dim=1)  # (N, P + T - 1)
        start = positions.amax(dim=(0, 2)).repeat_interleave(G) + 1  # (N,), as in sample()
        position = (start.unsqueeze(1) + torch.arange(T - 1, device=start.device)).expand(3, -1, -1)  # (3, N, T-1)
        training = model.training
        model.train(training or model.is_activation_checkpointing)  # HF checkpoints layers only in train mode
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask, position_ids=position,
                     past_key_values=cache, use_cache=True).logits  # (N, T - 1, V)
        model.train(training)
        logprobs.append(chosen_logprobs(rest, completion_ids[:, 1:], temperature))  # (N, T - 1)
    return torch.cat(logprobs, dim=1)  # (N, T)


def chosen_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, chunk_rows: int = 16) -> torch.Tensor:
    """log softmax(logits / temperature) at ids, fp32: (n, t, V) logits of any dtype -> (n, t).

    A few rows at a time, each recomputed in the backward pass, so the fp32 copy
    of the logits never exists whole, not even among the saved activations.
    """
    def rows_logprobs(rows, rows_ids):
        scaled = rows.float() / temperature  # (chunk_rows, t, V)
        return scaled.gather(-1, rows_ids.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(dim=-1)

    return torch.cat([checkpoint(rows_logprobs, rows, rows_ids, use_reentrant=False)
                      for rows, rows_ids in zip(logits.split(chunk_rows), ids.split(chunk_rows))])


def enable_grad_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Only the completion pass of token_logprobs is checkpointed (the model stays
    in eval mode otherwise); it reads the prompt's frozen cache (PromptCache),
    which makes the replay safe.
    """
    model.activation_checkpointing_enable()  # use_reentrant=False; HF checkpoints only in train mode
    for layer in model.model.language_model.layers:
        layer._can_checkpoint_with_cache = True


def sft_loss(model, tokenizer, prompts: data.PromptBatch, targets: list[str]) -> torch.Tensor:
    """Mean negative log-likelihood of each target text and <|im_end|>, on completion tokens only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [tokenizer(text)["input_ids"] + [end] for text in targets]
    T = max(len(t) for t in ids)
    completion_ids = torch.tensor([t + [end] * (T - len(t)) for t in ids])  # (B, T)
    completion_mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in ids])  # (B, T)
    device = prompts.input_ids.device
    logprobs = token_logprobs(model, prompts, completion_ids.to(device), completion_mask.to(device))  # (B, T)
    return -(logprobs * completion_mask.to(device)).sum() / completion_mask.sum()


@torch.no_grad()
def sync_reference(policy, reference, alpha: float) -> None:
    """ref = alpha * policy + (1 - alpha) * ref, shard by shard (both are sharded alike)."""
    policy.reshard()  # the root may still hold its last forward's full parameters
    reference.reshard()
    for ref_param, param in zip(reference.parameters(), policy.parameters()):
        ref_param.lerp_(param.to(ref_param.dtype), alpha)  # the reference may be stored in bf16


# ---------------------------------------------------------------- saving


def save_checkpoint(model, processor: Processor, folder, extra: dict, optimizer=None, trainer_state=None) -> None:
    """A Hugging Face folder that from_pretrained loads, gathered from FSDP2 on rank 0. Collective.

    Written to folder.tmp and renamed into place only when complete, so a crash
    at any moment leaves the previous checkpoint loadable. With an optimizer, the
    full optimizer state and trainer_state (tensors, numbers, strings: loadable
    with weights_only=True) go to trainer_state.pt for an exact resume.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    if dist.get_rank() == 0:
        folder = Path(folder)
        tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        model.generation_config.use_cache = True
        model.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        for name, content in extra.items():
            (tmp / name).write_text(json.dumps(content, indent=1))
        if optimizer is not None:
            torch.save({**trainer_state, "optimizer": optimizer_state}, tmp / "trainer_state.pt")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_trainer_state(model, optimizer, folder) -> dict:
    """Restore the optimizer from a checkpoint's trainer_state.pt and return the rest of it."""
    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
    return state
