"""The fast one-token forward of the decode loop: a static KV cache and CUDA graphs.

What it buys: on an H100 (dynamic decoder, Qwen2-VL-2B's shape) a decoded
token took about 40 ms where reading the weights and the cache once takes
about 1 ms (docs/speed.md): the time goes to Python and kernel launches.
Here the cache is preallocated and written in place, so every token has
the same shapes, and with graph=True the forward is compiled in one piece
and, on CUDA, replayed as a CUDA graph. How much of the 40 ms that saves
is not measured yet: `python bench.py --decoders dynamic,static,graph` on
a GPU prints it side by side.

What it leaves out: the graph decoder refuses sliding-window layers, and a
decode batch never shrinks below two rows (one row would compile again).

The reference is sampler.DynamicBatch (`--decoder dynamic`): Hugging Face's
DynamicCache, one position longer every token. Every decoder here must give
its tokens (tests/test_decoders.py).

Also here, used on every decoder: the decode loop's FSDP2 hooks set aside
and its attention by one_token_attention.

Shapes: n rows being decoded, P prompt tokens, V vocabulary,
H query heads, d head size.
"""

import contextlib
from collections import OrderedDict

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from model import forward_token


class StaticBatch:
    """The rows being decoded on a static cache of `length` positions.

    Every forward of a decode batch runs on the same input tensors, into
    which each token's ids and positions are copied. With graph on CUDA,
    the first forward runs as is (compiling it, the first time in a run);
    the second records it as a CUDA graph on those tensors, which it and
    every later token replay. Dropping rows makes a new decode batch, so
    the graph is recorded again, a few times per rollout.
    """

    def __init__(self, model, cache, attention_mask, length: int, graph: bool):
        """The prefill's cache and (B, P) attention mask; prompt + completion fit in length."""
        text = model.config.get_text_config()
        if graph and "sliding_attention" in (getattr(text, "layer_types", None) or []):
            # Hugging Face's static sliding-window layer counts tokens on the
            # host, which a CUDA graph would replay as a constant.
            raise ValueError(
                "the graph decoder does not run sliding-window layers: use static")
        self.model, self.cache, self.length = model, cache, length
        self.graph = graph
        self.forward_token = forward_token
        if graph:
            self.forward_token = torch.compile(forward_token, dynamic=True, fullgraph=True)
        # Fixed from here on: the causal mask already hides the positions not yet written.
        B, P = attention_mask.shape
        pad = attention_mask.new_ones(B, length - P)  # (B, length - P)
        self.attention_mask = torch.cat([attention_mask, pad], dim=1)  # (B, length)
        self.tokens = self.position = self.cuda_graph = self.logits = None

    def select(self, rows: torch.Tensor, filled: int) -> None:
        """Keep these rows (indices into the current ones; a row may repeat),
        whose first `filled` positions are written."""
        self.cache = static_rows(self.model, self.cache, rows, filled, self.length)
        self.attention_mask = self.attention_mask[rows]
        self.tokens = self.position = self.cuda_graph = self.logits = None

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V), fp32, after one more token (n, 1) per row
        at positions (3, n, 1); the token is written into the cache."""
        if self.tokens is None:
            # The decode batch's first forward: its input tensors from now on.
            self.tokens, self.position = tokens.clone(), position.clone()
            return self.run()  # (n, V)
        self.tokens.copy_(tokens)
        self.position.copy_(position)
        if not self.graph or not tokens.is_cuda:
            return self.run()  # (n, V)
        # Recorded at the second forward, so only a graph that will be replayed is recorded.
        if self.cuda_graph is None:
            self.record()
        self.cuda_graph.replay()
        # The next replay overwrites the graph's output.
        return self.logits.clone()  # (n, V)

    def run(self) -> torch.Tensor:
        """The forward on this decode batch's input tensors: (n, V)."""
        return self.forward_token(self.model, self.tokens, self.attention_mask,
                                  self.position, self.cache)

    def record(self) -> None:
        """Record run() as a CUDA graph; recording runs nothing (the cache is not written)."""
        self.cuda_graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (NCCL's watchdog) may go on meanwhile.
        with torch.cuda.graph(self.cuda_graph, capture_error_mode="thread_local"):
            self.logits = self.run()  # (n, V)


def static_rows(model, cache, rows: torch.Tensor, filled: int, length: int) -> StaticCache:
    """A new cache of `length` preallocated positions holding `rows` of the
    first `filled` positions of `cache`, layer by layer."""
    static = StaticCache(config=model.config, max_cache_len=length)
    for i, layer in enumerate(cache.layers):
        # (n, heads, filled, d) -> (len(rows), heads, length, d)
        static.update(layer.keys[rows, :, :filled], layer.values[rows, :, :filled], i)
    return static


@contextlib.contextmanager
def one_token_forwards(model):
    """FSDP's hooks set aside and attention by one_token_attention, for a decode loop."""
    with fsdp_hooks_set_aside(model), attention_set(model, "one_token_sdpa"):
        yield


@contextlib.contextmanager
def fsdp_hooks_set_aside(model):
    """Every forward hook of the model's FSDP2 units (FSDP's own; any other
    too) off for a while, on a model whose units all hold their full
    parameters (inside model.gathered_once, after a forward): FSDP then has
    nothing to do in a forward."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        # A no-op where the parameters are gathered already.
        unit.unshard()
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
    """SDPA of one query token per row on the key/value heads:
    query (n, H, 1, d) -> (n, 1, H, d).

    Under torch.compile, Hugging Face's SDPA copies every cached key and
    value once per query head sharing it (repeat_kv): 6 copies per layer
    per token for Qwen2-VL-2B's 12 query and 2 key/value heads, more than
    the weights it reads. Here the query heads of each key/value head
    attend as rows of one query instead, which is the same attention (one
    token's mask is the same for every row). Dropout is ignored: the
    decode loop runs in eval mode.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, **kwargs)
    n, heads, _, d = query.shape
    # Query heads h * groups ... (h + 1) * groups - 1 share key/value head h, as in repeat_kv.
    query = query.reshape(n, heads // groups, groups, d)  # (n, H / groups, groups, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling)  # (n, H / groups, groups, d)
    return out.reshape(n, heads, 1, d).transpose(1, 2), None  # (n, 1, H, d)


AttentionInterface.register("one_token_sdpa", one_token_attention)
AttentionMaskInterface.register("one_token_sdpa", sdpa_mask)
