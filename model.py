"""The network for training: loading, FSDP2, prefill, log-probs, SFT loss, reference sync.

The sampler (sampler.py) runs prefill() and forward_token() in its decode
loop; the training forward (token_logprobs) repeats the prefill's cache G
ways the same way.

Shapes: B prompts, G samples per prompt, N = B*G rows, n rows, P prompt
tokens, T completion tokens, V vocabulary.
"""

import functools
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForImageTextToText, DynamicCache

import lora
from inputs import PromptBatch


def load_model(path, dtype=torch.float32):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL model from a local Hugging Face folder, or from a LoRA
    adapter folder (PEFT's format) on the base model it names; nothing is downloaded."""
    if base := lora.base_of(path):
        return lora.load_adapter(load_model(base, dtype), path)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)


# The vision tower's parameters that project into the language model (--freeze_projector):
# the merger, and Qwen3-VL's deepstack mergers (one per vision layer it feeds to the decoder).
PROJECTOR_PREFIXES = ("merger.", "deepstack_merger_list.")


def load_models(cfg, path: str, device, policy_path: str | None = None) -> tuple:
    """train.py's policy (from policy_path when resuming), set up as cfg (train.Config) says,
    and only when beta > 0 a frozen reference: with LoRA the policy itself, whose adapters
    train.update_policy switches off."""
    policy = load_model(policy_path or path)
    if cfg.lora_rank and not policy_path:
        lora.add_adapters(policy, os.path.realpath(path), cfg.lora_rank, cfg.lora_alpha)
    freeze_vision(policy, cfg.freeze_vision_tower, cfg.freeze_projector)
    policy.to(device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(policy)
    shard(policy, bf16=cfg.dtype == "bf16", hybrid=cfg.hybrid_shard)
    if cfg.beta == 0 or cfg.algo != "grpo":
        return policy, None
    if cfg.lora_rank:
        return policy, policy
    # The reference never trains, so it is stored in the compute dtype (bf16 halves its memory).
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    reference = load_model(path, dtype).to(device).requires_grad_(False)
    shard(reference, bf16=cfg.dtype == "bf16", hybrid=cfg.hybrid_shard)
    return policy, reference


def freeze_vision(model, tower: bool, projector: bool) -> None:
    """The vision tower's parameters stop training: the tower's, the projector's, or both."""
    for name, param in model.model.visual.named_parameters():
        if projector if name.startswith(PROJECTOR_PREFIXES) else tower:
            param.requires_grad_(False)


def max_positions(path) -> int:
    """The language model's position limit, from the folder's (or adapter's base's) config.json."""
    config = AutoConfig.from_pretrained(lora.base_of(path) or path, local_files_only=True)
    return config.get_text_config().max_position_embeddings


# ---------------------------------------------------------------- distributed


def shard(model, bf16: bool, hybrid: bool = False) -> None:
    """FSDP2: the vision tower as one unit, each decoder layer as one, then the root.

    bf16 keeps fp32 master weights and reduces gradients in fp32. hybrid shards
    within a node and replicates across nodes (a 2-D device mesh, torchrun's
    LOCAL_WORLD_SIZE ranks per node): parameter all-gathers stay on the node's
    fast links, only the gradient all-reduce crosses nodes.
    """
    policy = MixedPrecisionPolicy()
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = None
    if hybrid:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu",
                                (dist.get_world_size() // per_node, per_node),
                                mesh_dim_names=("replicate", "shard"))
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
        # Every unit but the root, which keeps its own parameters gathered after forward.
        units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            return function(model, *args, **kwargs)
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()
    return wrapper


# ---------------------------------------------------------------- forwards and log-probs


def rope_positions(model, prompts: PromptBatch) -> torch.Tensor:
    """The 3-D rope positions (3, B, P) of Qwen2-VL's M-RoPE, which 2.5-VL and 3-VL keep: image
    tokens get (time, row, column), text counts on."""
    positions, _ = model.model.get_rope_index(prompts.input_ids, prompts.mm_token_type_ids,
                                              image_grid_thw=prompts.image_grid_thw,
                                              attention_mask=prompts.attention_mask)
    return positions


def prefill(model, prompts: PromptBatch, cache=None):
    """One forward over the B prompts and their images into a KV cache (a new one if None).

    Returns the model output (logits of the last position only, (B, 1, V)) and
    the rope positions (3, B, P). Qwen3-VL also adds its deepstack features to
    the image positions of the first decoder layers, which happens only here:
    completion tokens are text. Used by sample() and token_logprobs() alike.
    """
    positions = rope_positions(model, prompts)  # (3, B, P)
    out = model(**prompts.model_inputs(), position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out, positions


def forward_token(model, tokens, attention_mask, position, cache) -> torch.Tensor:
    """The next-token logits (n, V), fp32, of one new token (n, 1) per row on top of the cache.

    The decode loop's forward (sampler.py, and decoders.py compiles it).
    """
    out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=position,
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float()


class PromptCache(DynamicCache):
    """A KV cache that stops growing once frozen: the completion tokens attend to
    the prompt's keys and values without adding their own, so a checkpointed
    decoder layer, replayed in the backward pass, sees exactly what it saw."""

    frozen = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        keys = torch.cat([layer.keys, key_states], dim=-2)
        return keys, torch.cat([layer.values, value_states], dim=-2)


def token_logprobs(model, prompts: PromptBatch, completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor, temperature: float = 1.0,
                   group_size: int = 1, with_entropy: bool = False):
    """log pi(completion token t | prompt, tokens < t), fp32, at the sampling temperature: (N, T);
    with_entropy, also the entropy of each of those next-token distributions (N, T).

    Completion row i belongs to prompt row i // group_size. As in sample(), each
    prompt and its image are encoded once and the KV cache is repeated G times;
    the completions then run on top of it, and the gradient flows back through
    the shared cache. So a group costs P + G*T tokens, not G*(P + T). Logits are
    made only for completion positions. With gradient checkpointing enabled
    (enable_grad_checkpointing) the completion pass keeps only each decoder
    layer's input and recomputes the rest in the backward pass.
    """
    G, T = group_size, completion_ids.shape[1]
    cache = PromptCache()
    out, positions = prefill(model, prompts, cache)
    # Next-token shift: the prompt's last logit predicts completion token 0, completion
    # token t predicts token t + 1, and the last completion token predicts nothing.
    first = out.logits[:, -1:].repeat_interleave(G, dim=0)  # (N, 1, V)
    # (N, 1), or that and the entropy
    logprobs = [chosen_logprobs(first, completion_ids[:, :1], temperature, with_entropy)]
    if T > 1:
        cache.batch_repeat_interleave(G)  # (B, ...) -> (N, ...), differentiable
        cache.frozen = True
        prompt_mask = prompts.attention_mask.repeat_interleave(G, dim=0)  # (N, P)
        attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)  # (N, P + T - 1)
        start = positions.amax(dim=(0, 2)).repeat_interleave(G) + 1  # (N,), as in sample()
        offsets = torch.arange(T - 1, device=start.device)  # (T - 1,)
        position = (start.unsqueeze(1) + offsets).expand(3, -1, -1)  # (3, N, T - 1)
        training = model.training
        # HF checkpoints layers only in train mode.
        model.train(training or model.is_activation_checkpointing)
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask,
                     position_ids=position, past_key_values=cache, use_cache=True)
        rest = rest.logits  # (N, T - 1, V)
        model.train(training)
        logprobs.append(chosen_logprobs(rest, completion_ids[:, 1:], temperature,
                                        with_entropy))  # (N, T - 1)
    if with_entropy:
        return tuple(torch.cat(parts, dim=1) for parts in zip(*logprobs))  # (N, T) each
    return torch.cat(logprobs, dim=1)  # (N, T)


def chosen_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                    with_entropy: bool = False, chunk_rows: int = 16):
    """log softmax(logits / temperature) at ids, fp32: (n, t, V) logits of any dtype -> (n, t);
    with_entropy, also the entropy of each position's distribution (n, t).

    A few rows at a time, each recomputed in the backward pass, so the fp32 copy
    of the logits never exists whole, not even among the saved activations.
    """
    def rows_logprobs(rows, rows_ids):
        scaled = rows.float() / temperature  # (chunk_rows, t, V)
        logsumexp = scaled.logsumexp(dim=-1)  # (chunk_rows, t)
        chosen = scaled.gather(-1, rows_ids.unsqueeze(-1)).squeeze(-1) - logsumexp
        if not with_entropy:
            return chosen
        all_logprobs = scaled - logsumexp.unsqueeze(-1)  # (chunk_rows, t, V)
        return chosen, -(all_logprobs.exp() * all_logprobs).sum(dim=-1)

    pieces = [checkpoint(rows_logprobs, rows, rows_ids, use_reentrant=False)
              for rows, rows_ids in zip(logits.split(chunk_rows), ids.split(chunk_rows))]
    if with_entropy:
        return tuple(torch.cat(parts) for parts in zip(*pieces))  # (n, t) each
    return torch.cat(pieces)


def enable_grad_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Only the completion pass of token_logprobs is checkpointed (the model stays
    in eval mode otherwise); it reads the prompt's frozen cache (PromptCache),
    which makes the replay safe.
    """
    # use_reentrant=False; HF checkpoints only in train mode.
    model.activation_checkpointing_enable()
    for layer in model.model.language_model.layers:
        layer._can_checkpoint_with_cache = True


def sft_nll(model, tokenizer, prompts: PromptBatch, targets: list[str]) -> tuple:
    """The summed negative log-likelihood of each target text and <|im_end|> after its prompt,
    and how many tokens that is: (scalar, int)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [tokenizer(text)["input_ids"] + [end] for text in targets]
    T = max(len(t) for t in ids)
    completion_ids = torch.tensor([t + [end] * (T - len(t)) for t in ids])  # (B, T)
    completion_mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in ids])  # (B, T)
    device = prompts.input_ids.device
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    logprobs = token_logprobs(model, prompts, completion_ids, completion_mask)  # (B, T)
    return -(logprobs * completion_mask).sum(), int(completion_mask.sum())


def sequence_nll(model, batch: PromptBatch, loss_mask: torch.Tensor) -> tuple:
    """The summed negative log-likelihood of the tokens of loss_mask (B, P), each given every
    token before it (so never a row's first), in one forward over the whole texts, images
    included; and how many tokens that is: (scalar, int)."""
    positions = rope_positions(model, batch)  # (3, B, P)
    training = model.training
    # HF checkpoints layers only in train mode.
    model.train(training or model.is_activation_checkpointing)
    logits = model(**batch.model_inputs(), position_ids=positions, use_cache=False).logits
    model.train(training)
    # Next-token shift: position p predicts token p + 1.
    logprobs = chosen_logprobs(logits[:, :-1], batch.input_ids[:, 1:], 1.0)  # (B, P - 1)
    return -(logprobs * loss_mask[:, 1:]).sum(), int(loss_mask[:, 1:].sum())


@torch.no_grad()
def sync_reference(policy, reference, alpha: float) -> None:
    """ref = alpha * policy + (1 - alpha) * ref, shard by shard (both are sharded alike)."""
    # The root may still hold its last forward's full parameters.
    policy.reshard()
    reference.reshard()
    for ref_param, param in zip(reference.parameters(), policy.parameters()):
        # The reference may be stored in bf16.
        ref_param.lerp_(param.to(ref_param.dtype), alpha)
