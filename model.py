"""Everything that touches the network: loading, FSDP2, sampling, log-probs.

Shapes: B prompts, G samples per prompt, N = B*G rows, P prompt tokens,
T completion tokens, V vocabulary.
"""

import contextlib
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from transformers import (AttentionInterface, AutoConfig, AutoModelForImageTextToText,
                          DynamicCache, StaticCache)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import lora
from inputs import PromptBatch

# The policy must never sample these: a stray <|image_pad|> breaks the training forward.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>"]


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: <|im_end|>, <|endoftext|>, the generation config's eos."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def load_model(path, dtype=torch.float32):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL model from a local Hugging Face folder, or from a LoRA
    adapter folder (PEFT's format) on the base model it names; nothing is downloaded."""
    if base := lora.base_of(path):
        return lora.load_adapter(load_model(base, dtype), path)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)


# The vision tower's parameters that project into the language model (--freeze_projector):
# the merger, and Qwen3-VL's deepstack mergers (one per vision layer it feeds to the decoder).
PROJECTOR_PREFIXES = ("merger.", "deepstack_merger_list.")


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


# ---------------------------------------------------------------- sampling and log-probs


@dataclass
class Rollout:
    """N = B*G sampled completions; row i belongs to prompt i // G."""

    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T), 1 up to and including the end token
    logprobs: torch.Tensor  # (N, T), fp32, at the sampling temperature
    entropy: torch.Tensor  # (N, T), of the tempered next-token distribution
    truncated: torch.Tensor  # (N,), True if the length limit came before an end token


@dataclass
class Decoding:
    """How completions are drawn. Temperature 0 is greedy; top_k 0 and top_p 1 keep every token."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    end_ids: tuple[int, ...] = ()  # tokens that end a completion (none: rows run to the limit)
    banned_ids: tuple[int, ...] = ()  # tokens never drawn


def decoding_for(model, tokenizer, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0) -> Decoding:
    """Decoding that ends at the model's end tokens and never draws a vision token."""
    return Decoding(max_new_tokens, temperature, top_p, top_k,
                    tuple(end_token_ids(model, tokenizer)),
                    tuple(tokenizer.convert_tokens_to_ids(VISION_TOKENS)))


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts, end token and padding removed. Rewards score text, never token ids."""
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def prefill(model, prompts: PromptBatch, cache=None):
    """One forward over the B prompts and their images into a KV cache (a new one if None).

    Returns the model output (logits of the last position only, (B, 1, V)) and
    the 3-D rope positions (3, B, P) of Qwen2-VL's M-RoPE, which 2.5-VL and
    3-VL keep: image tokens get (time, row, column), text counts on. Qwen3-VL
    also adds its deepstack features to the image positions of the first
    decoder layers, which happens only here: completion tokens are text.
    Used by sample() and token_logprobs() alike.
    """
    positions, _ = model.model.get_rope_index(prompts.input_ids, prompts.mm_token_type_ids,
                                              image_grid_thw=prompts.image_grid_thw,
                                              attention_mask=prompts.attention_mask)  # (3, B, P)
    out = model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                position_ids=positions, pixel_values=prompts.pixel_values,
                image_grid_thw=prompts.image_grid_thw, mm_token_type_ids=prompts.mm_token_type_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out, positions


def draw_token(logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float,
               top_p: float, top_k: int, banned_ids: torch.Tensor) -> tuple:
    """One token per row from logits (n, V): the token, its log-prob and the entropy, each (n,).

    The token is drawn by inverse CDF with the row's uniform number (greedy when
    temperature is 0 or uniform is None), never among banned_ids, and only among
    the top_k and top_p tokens. Its log-prob and the entropy are those of the
    full tempered distribution, which is what the training forward computes: the
    ban, top-k and top-p only choose the token.
    """
    scaled = logits / (temperature if temperature > 0 else 1.0)  # (n, V)
    allowed = scaled.index_fill(1, banned_ids, float("-inf"))  # (n, V)
    if temperature > 0 and uniform is not None:
        kept = top_p_filter(top_k_filter(allowed, top_k), top_p)  # (n, V)
        cdf = kept.softmax(dim=-1).cumsum(dim=-1)  # (n, V)
        # The first token whose cumulative probability exceeds u; tokens of
        # probability 0 (banned, filtered) can never be that token.
        target = (uniform * cdf[:, -1]).unsqueeze(1)  # (n, 1)
        # The clamp only matters for NaN logits, which sample() then reports.
        token = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    else:
        token = allowed.argmax(dim=-1)  # (n,)
    all_logprobs = scaled.log_softmax(dim=-1)  # (n, V)
    logprob = all_logprobs.gather(1, token[:, None]).squeeze(1)  # (n,)
    entropy = -(all_logprobs.exp() * all_logprobs).sum(dim=-1)  # (n,)
    return token, logprob, entropy


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


# How sample() runs its one-token forward (train.py --decoder); all give the same tokens.
# dynamic: Hugging Face's DynamicCache, one position longer every token. static: a cache
# preallocated for prompt and completion, written in place, so the shapes stay fixed.
# graph: static, compiled, and on CUDA replayed as a CUDA graph (DecodeBatch).
DECODERS = ("dynamic", "static", "graph")


@torch.no_grad()
@gathered_once
def sample(model, prompts: PromptBatch, group_size: int, decoding: Decoding,
           generator: torch.Generator | None = None, rows: tuple[int, int] | None = None, stop=None,
           decoder: str = "dynamic") -> Rollout:
    """G completions per prompt from one prefill per prompt; this loop only keeps track of rows.

    The prompt and its image are encoded once, then the KV cache is repeated G
    times. Rows that ended leave the decode batch (once at least half of it has
    ended, so the cache is copied a few times, not every token). Under
    torch.distributed every rank keeps decoding until every row of every rank
    has ended, so FSDP's collectives stay in step.

    Each token takes one uniform number per row. rows = (first row of this
    rank, rows on all ranks): every rank draws the numbers for all rows from the
    same CPU generator and keeps its own, so the completions do not depend on
    how the prompts are split over ranks. stop(tokens (N, t)) -> (N,) bool may
    end rows early. decoder is one of DECODERS.
    """
    G, device = group_size, prompts.input_ids.device
    out, positions = prefill(model, prompts)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # (N, V)
    N, P = logits.shape[0], prompts.input_ids.shape[1]
    # The decode batch holds the rows `active` (n of the N); its cache, the logits
    # and the positions below have one row per active row.
    active = torch.arange(N, device=device)  # (n,)
    batch = DecodeBatch(model, out.past_key_values, prompts.attention_mask, decoder,
                        P + decoding.max_new_tokens)
    batch.select(active // G, P)  # each prompt's cache G times: (B, ...) -> (N, ...)
    del out  # its cache is the batch's now, or copied into a static one
    # Text after the prompt counts on from the prompt's largest position, whatever the padding.
    next_position = positions.amax(dim=(0, 2)).repeat_interleave(G) + 1  # (n,)
    # What rows that ended emit (masked out).
    filler = decoding.end_ids[0] if decoding.end_ids else 0
    end_ids = torch.tensor(decoding.end_ids, dtype=torch.long, device=device)
    banned_ids = torch.tensor(decoding.banned_ids, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    tokens, logprobs, masks, entropies = [], [], [], []

    def to_all_rows(values, fill):
        """(n,) values of the active rows -> (N,), fill for rows no longer in the batch."""
        full = torch.full((N,), fill, dtype=values.dtype, device=device)
        return full.index_copy(0, active, values)

    # Every unit's parameters are gathered now (gathered_once), so FSDP's hooks would only
    # cost Python per unit per token, and break torch.compile's graph apart. Attention runs
    # as one_token_attention, which copies no cached keys or values.
    with fsdp_hooks_set_aside(model), attention_set(model, "one_token_sdpa"):
        for t in range(decoding.max_new_tokens):
            # NaN or inf weights, or an overflow, show here first.
            finite = logits.isfinite().all()
            uniform = None
            if decoding.temperature > 0:
                first, total = rows or (0, N)
                uniform = torch.rand(total, generator=generator)[first:first + N]  # (N,)
                uniform = uniform.to(device)[active]  # (n,)
            token, logprob, entropy = draw_token(logits, uniform, decoding.temperature,
                                                 decoding.top_p, decoding.top_k,
                                                 banned_ids)  # (n,) each
            # (N,): rows that ended emit padding.
            step_token = torch.where(finished, filler, to_all_rows(token, filler))
            tokens.append(step_token)
            logprobs.append(to_all_rows(logprob, 0.0))  # (N,)
            entropies.append(to_all_rows(entropy, 0.0))  # (N,)
            masks.append(~finished)
            finished = finished | torch.isin(step_token, end_ids)
            if stop is not None:
                finished = finished | stop(torch.stack(tokens, dim=1))
            # The one host synchronization per token: how many active rows go on, whether
            # every rank is done, and whether every rank's logits were finite (so all ranks
            # stop together).
            going_on = ~finished[active]  # (n,)
            flags = torch.stack([(~going_on).all(), finite]).int()  # (2,)
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            left, done, finite = torch.cat([going_on.sum().view(1), flags]).tolist()
            if not finite:
                raise FloatingPointError(
                    f"the model's logits are NaN or infinite at completion token {t}: its "
                    f"weights hold NaN or inf, or the forward overflowed")
            if done or t == decoding.max_new_tokens - 1:
                break
            # Drop the ended rows once half have ended, down to 2 rows (a forward must still
            # run, and the compiled graph decoder would compile again for a single row).
            if 1 < left <= len(active) // 2:
                keep = going_on.nonzero().squeeze(1)  # (left,)
                batch.select(keep, P + t)
                active, next_position = active[keep], next_position[keep]
            n = len(active)
            position = (next_position + t).view(1, n, 1).expand(3, n, 1)  # (3, n, 1)
            logits = batch.forward(step_token[active, None], position)  # (n, V)
    mask = torch.stack(masks, dim=1)  # (N, T)
    return Rollout(
        completion_ids=torch.stack(tokens, dim=1),  # (N, T)
        completion_mask=mask.long(),  # (N, T)
        logprobs=torch.stack(logprobs, dim=1) * mask,  # (N, T), 0 after the end
        entropy=torch.stack(entropies, dim=1) * mask,  # (N, T), 0 after the end
        truncated=~finished,  # (N,)
    )


def forward_token(model, tokens, attention_mask, position, cache) -> torch.Tensor:
    """The next-token logits (n, V), fp32, of one new token (n, 1) per row on top of the cache."""
    out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=position,
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float()


class DecodeBatch:
    """The rows being decoded: their KV cache, attention mask and one-token forward (DECODERS).

    The static decoders run every forward of a decode batch on the same input
    tensors, into which each token's ids and positions are copied. With graph on
    CUDA, the first forward runs as is (compiling it, the first time in a run);
    the second records it as a CUDA graph on those tensors, which it and every
    later token replay. Dropping rows makes a new decode batch, so the graph is
    recorded again, a few times per rollout.
    """

    def __init__(self, model, cache, attention_mask, decoder: str, length: int):
        """The prefill's cache and (B, P) attention mask; prompt + completion fit in length."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: one of {DECODERS}")
        layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
        if decoder == "graph" and "sliding_attention" in layer_types:
            # Hugging Face's static sliding-window layer counts tokens on the host, which a
            # CUDA graph would replay as a constant.
            raise ValueError("the graph decoder does not run sliding-window layers: use static")
        self.model, self.cache, self.decoder, self.length = model, cache, decoder, length
        self.forward_token = forward_token
        if decoder == "graph":
            self.forward_token = torch.compile(forward_token, dynamic=True, fullgraph=True)
        if decoder != "dynamic":
            # Fixed from here on: the causal mask already hides the positions not yet written.
            B, P = attention_mask.shape
            pad = attention_mask.new_ones(B, self.length - P)  # (B, length - P)
            attention_mask = torch.cat([attention_mask, pad], dim=1)  # (B, length)
        self.attention_mask = attention_mask
        self.tokens = self.position = self.graph = self.logits = None

    def select(self, rows: torch.Tensor, filled: int) -> None:
        """Keep these rows (indices into the current ones; a row may repeat), whose first
        `filled` positions are written."""
        if self.decoder == "dynamic":
            self.cache.batch_select_indices(rows)
        else:
            self.cache = static_rows(self.model, self.cache, rows, filled, self.length)
        self.attention_mask = self.attention_mask[rows]
        self.tokens = self.position = self.graph = self.logits = None

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V), fp32, after one more token (n, 1) per row at positions
        (3, n, 1); the token is written into the cache."""
        if self.decoder == "dynamic":
            ones = self.attention_mask.new_ones(len(tokens), 1)
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)  # (n, P + t + 1)
            return self.forward_token(self.model, tokens, self.attention_mask, position,
                                      self.cache)
        if self.tokens is None:
            # The decode batch's first forward: its input tensors from now on.
            self.tokens, self.position = tokens.clone(), position.clone()
            return self.run()  # (n, V)
        self.tokens.copy_(tokens)
        self.position.copy_(position)
        if self.decoder != "graph" or not tokens.is_cuda:
            return self.run()  # (n, V)
        # Recorded at the second forward, so only a graph that will be replayed is recorded.
        if self.graph is None:
            self.record()
        self.graph.replay()
        # The next replay overwrites the graph's output.
        return self.logits.clone()  # (n, V)

    def run(self) -> torch.Tensor:
        """The forward on this decode batch's input tensors: (n, V)."""
        return self.forward_token(self.model, self.tokens, self.attention_mask, self.position,
                                  self.cache)

    def record(self) -> None:
        """Record run() as a CUDA graph; recording runs nothing (the cache is not written)."""
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (NCCL's watchdog) may go on meanwhile.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self.run()  # (n, V)


def static_rows(model, cache, rows: torch.Tensor, filled: int, length: int) -> StaticCache:
    """A new cache of `length` preallocated positions holding `rows` of the first `filled`
    positions of `cache`, layer by layer: (n, heads, filled, d) -> (len(rows), heads, length, d)."""
    static = StaticCache(config=model.config, max_cache_len=length)
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys[rows, :, :filled], layer.values[rows, :, :filled], i)
    return static


@contextlib.contextmanager
def fsdp_hooks_set_aside(model):
    """Every forward hook of the model's FSDP2 units (FSDP's own; any other too) off for a
    while, on a model whose units all hold their full parameters (inside gathered_once, after
    a forward): FSDP then has nothing to do in a forward."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()  # a no-op where the parameters are gathered already
    hooks = [(unit._forward_pre_hooks, unit._forward_hooks) for unit in units]
    for unit in units:
        unit._forward_pre_hooks, unit._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for unit, (pre, post) in zip(units, hooks):
            unit._forward_pre_hooks, unit._forward_hooks = pre, post


@contextlib.contextmanager
def attention_set(model, name: str):
    """The language model's attention by another Hugging Face attention function for a while."""
    config = model.config.get_text_config()
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def one_token_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA of one query token per row on the key/value heads: query (n, H, 1, d) -> (n, 1, H, d).

    Under torch.compile, Hugging Face's SDPA copies every cached key and value once
    per query head sharing it (repeat_kv): 6 copies per layer per token for
    Qwen2-VL-2B's 12 query and 2 key/value heads, more than the weights it reads.
    Here the query heads of each key/value head attend as rows of one query instead,
    which is the same attention (one token's mask is the same for every row).
    Dropout is ignored: the decode loop runs in eval mode.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      **kwargs)
    n, heads, _, d = query.shape
    # Query heads h * groups ... (h + 1) * groups - 1 share key/value head h, as in repeat_kv.
    query = query.reshape(n, heads // groups, groups, d)  # (n, H / groups, groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling)  # (n, H / groups, groups, d)
    return out.reshape(n, heads, 1, d).transpose(1, 2), None  # (n, 1, H, d)


AttentionInterface.register("one_token_sdpa", one_token_attention)
AttentionMaskInterface.register("one_token_sdpa", sdpa_mask)


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
                   group_size: int = 1) -> torch.Tensor:
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
    cache = PromptCache()
    out, positions = prefill(model, prompts, cache)
    # Next-token shift: the prompt's last logit predicts completion token 0, completion
    # token t predicts token t + 1, and the last completion token predicts nothing.
    first = out.logits[:, -1:].repeat_interleave(G, dim=0)  # (N, 1, V)
    logprobs = [chosen_logprobs(first, completion_ids[:, :1], temperature)]  # (N, 1)
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
        logprobs.append(chosen_logprobs(rest, completion_ids[:, 1:], temperature))  # (N, T - 1)
    return torch.cat(logprobs, dim=1)  # (N, T)


def chosen_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                    chunk_rows: int = 16) -> torch.Tensor:
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
    # use_reentrant=False; HF checkpoints only in train mode.
    model.activation_checkpointing_enable()
    for layer in model.model.language_model.layers:
        layer._can_checkpoint_with_cache = True


def sft_loss(model, tokenizer, prompts: PromptBatch, targets: list[str],
             all_ranks: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood of each target text and <|im_end|>, over its tokens, or
    with all_ranks over the target tokens of every rank (a collective): FSDP averages the
    ranks' gradients, so each rank divides its sum by the mean count per rank."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [tokenizer(text)["input_ids"] + [end] for text in targets]
    T = max(len(t) for t in ids)
    completion_ids = torch.tensor([t + [end] * (T - len(t)) for t in ids])  # (B, T)
    completion_mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in ids])  # (B, T)
    device = prompts.input_ids.device
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    logprobs = token_logprobs(model, prompts, completion_ids, completion_mask)  # (B, T)
    count = completion_mask.sum().float()
    if all_ranks:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return -(logprobs * completion_mask).sum() / count


@torch.no_grad()
def sync_reference(policy, reference, alpha: float) -> None:
    """ref = alpha * policy + (1 - alpha) * ref, shard by shard (both are sharded alike)."""
    # The root may still hold its last forward's full parameters.
    policy.reshard()
    reference.reshard()
    for ref_param, param in zip(reference.parameters(), policy.parameters()):
        # The reference may be stored in bf16.
        ref_param.lerp_(param.to(ref_param.dtype), alpha)
