"""Rollouts: draw one token per row, and the row loop around it (sample).

Shapes: B prompts, G samples per prompt, N = B*G rows, n rows still being
decoded, P prompt tokens, T completion tokens, V vocabulary.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

import decoders
from inputs import PromptBatch
from model import forward_token, gathered_once, prefill

# The policy must never sample these: a stray <|image_pad|> breaks the training forward.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                 "<|image_pad|>", "<|video_pad|>"]

# How sample() runs its one-token forward (train.py --decoder); all give the
# same tokens. dynamic is the reference (DynamicBatch); static and graph are
# the fast ones in decoders.py (decoders.StaticBatch).
DECODERS = ("dynamic", "static", "graph")


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


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: <|im_end|>, <|endoftext|>, the generation config's eos."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def decoding_for(model, tokenizer, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0) -> Decoding:
    """Decoding that ends at the model's end tokens and never draws a vision token, nor an id
    the tokenizer does not have: Qwen's embedding has 151,936 rows for 151,657 tokens, and
    decode() would drop such an id without a word, so the reward would not see it."""
    beyond = range(len(tokenizer), model.config.get_text_config().vocab_size)
    return Decoding(max_new_tokens, temperature, top_p, top_k,
                    tuple(end_token_ids(model, tokenizer)),
                    tuple(tokenizer.convert_tokens_to_ids(VISION_TOKENS)) + tuple(beyond))


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts, end token and padding removed. Rewards score text, never token ids."""
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def draw_token(logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float,
               top_p: float, top_k: int, banned_ids: torch.Tensor) -> tuple:
    """One token per row from logits (n, V): the token, its log-prob and the entropy, each (n,).

    The token is drawn by inverse CDF with the row's uniform number (greedy
    when temperature is 0 or uniform is None), never among banned_ids, and
    only among the top_k and top_p tokens. Its log-prob and the entropy are
    those of the full tempered distribution, which is what the training
    forward computes: the ban, top-k and top-p only choose the token.
    """
    scaled = logits / (temperature if temperature > 0 else 1.0)  # (n, V)
    allowed = scaled.index_fill(1, banned_ids, float("-inf"))  # (n, V)
    if temperature > 0 and uniform is not None:
        kept = top_p_filter(top_k_filter(allowed, top_k), top_p)  # (n, V)
        cdf = kept.softmax(dim=-1).cumsum(dim=-1)  # (n, V)
        # The first token whose cumulative probability exceeds u; tokens of
        # probability 0 (banned, filtered) can never be that token.
        target = (uniform * cdf[:, -1]).unsqueeze(1)  # (n, 1)
        token = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (n,)
        # The clamp only matters for NaN logits, which sample() then reports.
        token = token.clamp(max=cdf.shape[1] - 1)
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
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (n, V)
    probs = sorted_logits.softmax(dim=-1)  # (n, V)
    # Drop a token when the tokens before it already reach top_p (the first one always stays).
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # (n, V)
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (and any tied with the k-th); 0 keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def uniforms(generator, rows: tuple[int, int] | None, N: int) -> torch.Tensor:
    """This rank's N uniform numbers for one token, (N,): every rank draws all
    rows' numbers and keeps its own, rows = (first row here, rows on all ranks)."""
    first, total = rows or (0, N)
    return torch.rand(total, generator=generator)[first:first + N]


class DynamicBatch:
    """The rows being decoded on Hugging Face's DynamicCache, the reference decoder:
    the cache and the attention mask grow by one position every token."""

    def __init__(self, model, cache, attention_mask):
        """The prefill's cache and (B, P) attention mask."""
        self.model, self.cache, self.attention_mask = model, cache, attention_mask

    def select(self, rows: torch.Tensor, filled: int) -> None:
        """Keep these rows (indices into the current ones; a row may repeat);
        the cache holds exactly the `filled` positions written."""
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V), fp32, after one more token (n, 1) per row at (3, n, 1)."""
        ones = self.attention_mask.new_ones(len(tokens), 1)  # (n, 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)  # (n, P + t + 1)
        return forward_token(self.model, tokens, self.attention_mask, position, self.cache)


def decode_batch(model, cache, attention_mask, decoder: str, length: int):
    """The decode batch of a decoder in DECODERS; prompt + completion fit in length."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder {decoder!r}: one of {DECODERS}")
    if decoder == "dynamic":
        return DynamicBatch(model, cache, attention_mask)
    return decoders.StaticBatch(model, cache, attention_mask, length, graph=decoder == "graph")


@torch.no_grad()
@gathered_once
def sample(model, prompts: PromptBatch, group_size: int, decoding: Decoding,
           generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
           stop=None, decoder: str = "dynamic") -> Rollout:
    """G completions per prompt from one prefill per prompt; the loop only keeps track of rows.

    Rows that ended leave the decode batch once at least half of it has
    ended (so the cache is copied a few times, not every token). Under
    torch.distributed every rank decodes until every row of every rank has
    ended, so FSDP's collectives stay in step. rows = (first row of this
    rank, rows on all ranks) keeps each row's uniform numbers the same on any
    split over ranks (uniforms). stop(tokens (N, t)) -> (N,) bool may end rows
    early. decoder is one of DECODERS.
    """
    G, device = group_size, prompts.input_ids.device
    # 1) prefill: each prompt and its image once.
    out, positions = prefill(model, prompts)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # (N, V)
    N, P = logits.shape[0], prompts.input_ids.shape[1]

    # 2) repeat the cache G ways. The decode batch holds the rows `active`
    # (n of the N); its cache, the logits and the positions have a row each.
    active = torch.arange(N, device=device)  # (n,)
    batch = decode_batch(model, out.past_key_values, prompts.attention_mask, decoder,
                         P + decoding.max_new_tokens)
    batch.select(active // G, P)  # (B, ...) -> (N, ...)
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

    with decoders.one_token_forwards(model):
        for t in range(decoding.max_new_tokens):
            # 3) draw one token per active row.
            # NaN or inf weights, or an overflow, show here first.
            finite = logits.isfinite().all()
            uniform = None
            if decoding.temperature > 0:
                uniform = uniforms(generator, rows, N).to(device)[active]  # (n,)
            token, logprob, entropy = draw_token(
                logits, uniform, decoding.temperature, decoding.top_p, decoding.top_k,
                banned_ids)  # (n,) each
            # Rows that ended emit padding.
            step_token = torch.where(finished, filler, to_all_rows(token, filler))  # (N,)
            tokens.append(step_token)
            logprobs.append(to_all_rows(logprob, 0.0))  # (N,)
            entropies.append(to_all_rows(entropy, 0.0))  # (N,)
            masks.append(~finished)

            # 4) stop: at an end token, at stop(), or once every rank's rows ended.
            finished = finished | torch.isin(step_token, end_ids)
            if stop is not None:
                finished = finished | stop(torch.stack(tokens, dim=1))
            # The one host synchronization per token: how many active rows
            # go on, whether every rank is done, and whether every rank's
            # logits were finite (so all ranks stop together).
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

            # 5) shrink: drop the ended rows once half have ended, down to 2
            # rows (a forward must still run, and the graph decoder would
            # compile again for a single row); then the next token's forward.
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
