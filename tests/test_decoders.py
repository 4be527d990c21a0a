"""The static-cache and graph decoders against the dynamic one and the training forward.

Every decoder must draw the same tokens with the same log-probs (1e-5, fp32) as
the dynamic decoder, for G > 1 rows on a shared prompt, left padding and rows
that end at different steps (so the decode batch shrinks), and those log-probs
must be the training forward's.
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from transformers import StaticCache

import decoders
import model as modellib
import sampler
from helpers import SIZES, SMALL, encode, metrics, repeat_prompts, run

G = 4
# Row i ends after 2 + i % 7 tokens: the 12 rows of 3 prompts end at 7 different steps.
LENGTHS = 2 + torch.arange(3 * G) % 7


def rollout(model, batch, decoder, **changes):
    """A sampled (temperature 1) rollout of G rows per prompt, rows ending at LENGTHS."""
    decoding = sampler.Decoding(10, **changes)
    return sampler.sample(model, batch, G, decoding, generator=torch.Generator().manual_seed(0),
                          stop=lambda tokens: LENGTHS.to(tokens.device) <= tokens.shape[1],
                          decoder=decoder)


def assert_same_rollout(ours, dynamic):
    assert torch.equal(ours.completion_ids, dynamic.completion_ids)
    assert torch.equal(ours.completion_mask, dynamic.completion_mask)
    assert ours.completion_mask.sum(dim=1).tolist() == LENGTHS.tolist()
    torch.testing.assert_close(ours.logprobs, dynamic.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.entropy, dynamic.entropy, rtol=0, atol=1e-5)


def test_static_decoder_draws_the_dynamic_rollout(any_model, mixed_samples):
    """The same tokens and log-probs as the dynamic decoder, and those are the training
    forward's."""
    model, processor = any_model
    batch = encode(processor, mixed_samples, SIZES["different"])
    assert (batch.attention_mask == 0).any(), "the batch must be left-padded to test padding"
    seen, text = [], model.config.get_text_config()

    def note_forward(module, args, kwargs):
        """Rows, cache width, cache type and attention of each forward."""
        seen.append((kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[1],
                     type(kwargs["past_key_values"]), text._attn_implementation))

    hook = model.register_forward_pre_hook(note_forward, with_kwargs=True)
    static = rollout(model, batch, "static")
    hook.remove()
    assert_same_rollout(static, rollout(model, batch, "dynamic"))
    # After the prefill, every forward ran on a preallocated cache of one fixed length,
    # with one_token_attention, on a decode batch that shrank more than once.
    decode_steps = [step[:3] for step in seen[1:]]
    assert {step[3] for step in seen} == {"sdpa", "one_token_sdpa"} == {seen[0][3], seen[1][3]}
    assert text._attn_implementation == "sdpa"
    assert {kind for _, _, kind in decode_steps} == {StaticCache}
    assert len({width for _, width, _ in decode_steps}) == 1
    assert decode_steps[0][0] == 3 * G and len({rows for rows, _, _ in decode_steps}) >= 3
    with torch.no_grad():
        logprobs = modellib.token_logprobs(model, repeat_prompts(batch, G), static.completion_ids,
                                           static.completion_mask)
    mask = static.completion_mask.bool()
    torch.testing.assert_close(logprobs[mask], static.logprobs[mask], rtol=0, atol=1e-5)


def test_graph_decoder_compiles_whole_under_fsdp2(tiny, mixed_samples, single_process_group):
    """fullgraph=True in the graph decoder: a break in the graph (an FSDP hook left in
    place, say) fails here. On the CPU there is no CUDA graph: this is torch.compile. It
    draws the dynamic decoder's tokens."""
    model, processor = tiny
    batch = encode(processor, mixed_samples, SIZES["different"])
    dynamic = rollout(model, batch, "dynamic", top_k=20)
    modellib.shard(model, bf16=False)
    assert_same_rollout(rollout(model, batch, "graph", top_k=20), dynamic)
    # A second rollout (new caches, input tensors and FSDP hook dicts; the same shapes)
    # compiles nothing new: every rollout would pay for it, and on CUDA it could come
    # while a graph is recorded.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_same_rollout(rollout(model, batch, "graph", top_k=20), dynamic)
    # FSDP's hooks are back: a training forward still gathers the sharded weights.
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert all(unit._forward_pre_hooks for unit in units)
    logprobs = modellib.token_logprobs(model, repeat_prompts(batch, G), dynamic.completion_ids,
                                       dynamic.completion_mask)
    mask = dynamic.completion_mask.bool()
    torch.testing.assert_close(logprobs[mask], dynamic.logprobs[mask], rtol=0, atol=1e-5)


def test_one_token_attention_repeats_kv_heads():
    """Oracle: each key/value head repeated for the query heads that share it."""
    torch.manual_seed(0)
    n, heads, kv_heads, length, d = 3, 6, 2, 9, 4
    query = torch.randn(n, heads, 1, d)
    key, value = torch.randn(n, kv_heads, length, d), torch.randn(n, kv_heads, length, d)
    mask = torch.rand(n, 1, 1, length) < 0.6
    mask[..., 0] = True  # every row attends somewhere
    groups = heads // kv_heads
    module = SimpleNamespace(num_key_value_groups=groups)
    ours, _ = decoders.one_token_attention(module, query, key, value, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1),
        attn_mask=mask, scale=0.3)  # (n, heads, 1, d)
    torch.testing.assert_close(ours, expected.transpose(1, 2), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_decoder_replays_cuda_graphs(tiny, mixed_samples, monkeypatch):
    """On a GPU the graph decoder records a CUDA graph per decode batch and replays it."""
    model, processor = tiny
    model.cuda()
    batch = encode(processor, mixed_samples, SIZES["different"]).to("cuda")
    dynamic = rollout(model, batch, "dynamic")
    recorded = []
    record = decoders.StaticBatch.record
    monkeypatch.setattr(decoders.StaticBatch, "record",
                        lambda self: recorded.append(len(self.tokens)) or record(self))
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        modellib.shard(model, bf16=False)
        assert_same_rollout(rollout(model, batch, "graph"), dynamic)
    finally:
        dist.destroy_process_group()
    # A graph per decode batch, the first of all 3 * G rows; fewer each time rows are dropped.
    assert recorded[0] == 3 * G and len(recorded) >= 3 and recorded == sorted(recorded)[::-1]


def test_an_unknown_decoder_is_refused(tiny):
    model, _ = tiny
    mask = torch.ones(2, 5, dtype=torch.long)  # (B, P)
    with pytest.raises(ValueError, match="'fast': one of"):
        sampler.decode_batch(model, None, mask, "fast", 10)


def test_graph_decoder_refuses_sliding_window_layers(tiny):
    model, _ = tiny
    mask = torch.ones(2, 5, dtype=torch.long)  # (B, P)
    sampler.decode_batch(model, None, mask, "graph", 10)  # full attention: taken
    text = model.config.get_text_config()
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    with pytest.raises(ValueError, match="does not run sliding-window layers"):
        sampler.decode_batch(model, None, mask, "graph", 10)


def test_fsdp_hooks_come_back_when_sampling_fails(tiny, mixed_samples, single_process_group):
    model, processor = tiny
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    modellib.shard(model, bf16=False)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    hooks = [dict(unit._forward_pre_hooks) for unit in units]
    with pytest.raises(FloatingPointError):
        rollout(model, encode(processor, mixed_samples, SIZES["equal"] + [(56, 56)]), "static")
    assert [dict(unit._forward_pre_hooks) for unit in units] == hooks and all(hooks)


def test_static_on_two_ranks_trains_like_dynamic_on_one(tiny_path, tmp_path):
    """FSDP2 over 2 gloo ranks, the decode loop on gathered weights without FSDP's hooks:
    the same completions (rollouts.jsonl), rewards, losses and weights as one process on
    the dynamic decoder."""
    args = ["train.py", "--steps", "2", "--lr", "1e-4", "--rollouts_every", "1", *SMALL]
    run([*args, "--output_dir", str(tmp_path / "dynamic")])
    run([*args, "--output_dir", str(tmp_path / "static"), "--decoder", "static"], nproc=2)
    assert completions(tmp_path / "static") == completions(tmp_path / "dynamic")
    assert len(completions(tmp_path / "dynamic")) == 2
    one, two = metrics(tmp_path / "dynamic"), metrics(tmp_path / "static")
    for a, b in zip(one, two):
        assert a["reward"] == b["reward"] and a["completion_len"] == b["completion_len"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    weights = load_file(tmp_path / "static" / "final" / "model.safetensors")
    for name, weight in load_file(tmp_path / "dynamic" / "final" / "model.safetensors").items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=1e-5)


def completions(folder) -> list:
    """Each logged rollout's completions and their rewards."""
    lines = (folder / "rollouts.jsonl").read_text().splitlines()
    return [(r["completions"], r["rewards"]) for r in map(json.loads, lines)]
