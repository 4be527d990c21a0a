"""The sampler and log-probs against Hugging Face transformers as the oracle."""

import copy
import json
import shutil

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

import checkpoint
import inputs
import model as modellib
import sampler
from helpers import SIZES, encode, repeat_prompts
from tiny import CHAT_TEMPLATE, tiny_config


def test_greedy_sampler_equals_generate(any_model, mixed_samples):
    model, processor = any_model
    batch = encode(processor, mixed_samples, SIZES["different"])
    assert (batch.attention_mask == 0).any(), "the batch must be left-padded to test padding"
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    ours = sampler.sample(model, batch, 1, sampler.Decoding(12, temperature=0.0, end_ids=end_ids))
    generated = model.generate(**batch.model_inputs(), max_new_tokens=12, do_sample=False,
                               eos_token_id=end_ids, pad_token_id=end_ids[0])
    theirs = generated[:, batch.input_ids.shape[1]:]
    for row in range(len(mixed_samples)):
        n = int(ours.completion_mask[row].sum())
        assert ours.completion_ids[row, :n].tolist() == theirs[row, :n].tolist()
        assert n == theirs.shape[1] or theirs[row, n - 1].item() in end_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_training_forward(any_model, mixed_samples, temperature):
    model, processor = any_model
    batch = encode(processor, mixed_samples, SIZES["different"])
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    banned = processor.tokenizer.convert_tokens_to_ids(sampler.VISION_TOKENS)
    decoding = sampler.Decoding(16, temperature, end_ids=end_ids, banned_ids=banned)
    rollout = sampler.sample(model, batch, 3, decoding,
                             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs = modellib.token_logprobs(model, repeat_prompts(batch, 3), rollout.completion_ids,
                                           rollout.completion_mask, temperature)
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 3 * len(mixed_samples)
    torch.testing.assert_close(logprobs[mask], rollout.logprobs[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sizes", ["equal", "different"])
@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("B", [1, 2])
def test_repeated_rows_carry_their_own_prompts_image(tiny, mixed_samples, B, G, sizes):
    _, processor = tiny
    batch = encode(processor, mixed_samples[:B], SIZES[sizes][:B])
    expanded = repeat_prompts(batch, G)
    images = batch.pixel_values.split(batch.image_grid_thw.prod(-1).tolist())
    rows = expanded.pixel_values.split(expanded.image_grid_thw.prod(-1).tolist())
    assert len(rows) == B * G
    for i in range(B * G):
        assert torch.equal(rows[i], images[i // G])
        assert torch.equal(expanded.image_grid_thw[i], batch.image_grid_thw[i // G])
        assert torch.equal(expanded.input_ids[i], batch.input_ids[i // G])
        assert torch.equal(expanded.mm_token_type_ids[i], batch.mm_token_type_ids[i // G])


def test_sampler_never_emits_vision_tokens(tiny, mixed_samples):
    model, processor = tiny
    banned = processor.tokenizer.convert_tokens_to_ids(sampler.VISION_TOKENS)
    head = model.lm_head

    class PreferVisionTokens(torch.nn.Module):
        """The real head plus a large bonus on the vision tokens: a model that would emit them."""

        def forward(self, hidden):
            logits = head(hidden)
            logits[..., banned] += 50.0
            return logits

    model.lm_head = PreferVisionTokens()
    batch = encode(processor, mixed_samples, SIZES["equal"] + [(56, 56)])
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    unbanned = sampler.sample(model, batch, 2, sampler.Decoding(4, end_ids=end_ids),
                              generator=torch.Generator().manual_seed(0))
    assert torch.isin(unbanned.completion_ids, torch.tensor(banned)).any()
    rollout = sampler.sample(model, batch, 2,
                             sampler.Decoding(4, end_ids=end_ids, banned_ids=banned),
                             generator=torch.Generator().manual_seed(0))
    assert not torch.isin(rollout.completion_ids, torch.tensor(banned)).any()


def test_ended_rows_leave_without_changing_the_others(tiny, mixed_samples):
    """Oracle: the same draws with no row ending, so the decode batch never shrinks.

    A stop rule ends row i after 2 + i % 7 tokens. Each row's tokens up to its
    end, and their log-probs, must be the same in both runs; and the decode
    batch must really have shrunk, more than once.
    """
    model, processor = tiny
    batch = encode(processor, mixed_samples, SIZES["different"])
    lengths = 2 + torch.arange(12) % 7  # (N,)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    ended = sampler.sample(model, batch, 4, sampler.Decoding(12),
                           generator=torch.Generator().manual_seed(0),
                           stop=lambda tokens: lengths <= tokens.shape[1])
    hook.remove()
    never_ends = sampler.sample(model, batch, 4, sampler.Decoding(12),
                                generator=torch.Generator().manual_seed(0))

    assert ended.completion_mask.sum(dim=1).tolist() == lengths.tolist()
    # A prefill of 3 prompts, then 12 rows.
    assert batch_sizes[:2] == [3, 12] and len(set(batch_sizes[1:])) >= 3
    for row, n in enumerate(lengths.tolist()):
        assert ended.completion_ids[row, :n].tolist() == never_ends.completion_ids[row, :n].tolist()
        torch.testing.assert_close(ended.logprobs[row, :n], never_ends.logprobs[row, :n],
                                   rtol=0, atol=1e-5)
        assert (ended.logprobs[row, n:] == 0).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = sampler.top_p_filter(probs.log(), 0.8).isfinite()
    # 0.5 < 0.8, 0.5 + 0.3 = 0.8 reaches it: the first two stay.
    assert kept.tolist() == [[True, True, False, False]]


def test_sampling_follows_the_model_distribution(tiny, mixed_samples):
    """Inverse-CDF sampling: the first token's empirical frequencies match the softmax."""
    model, processor = tiny
    batch = encode(processor, mixed_samples[:1], [(56, 56)])
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, batch, 4000, sampler.Decoding(1, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = model(**batch.model_inputs()).logits[0, -1].softmax(-1)
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=probs.numel()) / 4000
    assert (counts - probs).abs().max() < 0.03


def top3_draws(processor, mixed_samples):
    """A random model's first-token distribution (nearly flat) and 4000 first tokens drawn from
    it with top-k 3."""
    torch.manual_seed(1)
    model = Qwen2VLForConditionalGeneration(tiny_config(processor.tokenizer)).eval()
    batch = encode(processor, mixed_samples[:1], [(56, 56)])
    with torch.no_grad():
        probs = model(**batch.model_inputs()).logits[0, -1].softmax(-1)
    rollout = sampler.sample(model, batch, 4000, sampler.Decoding(1, top_k=3),
                             generator=torch.Generator().manual_seed(0))
    return probs, rollout


def test_top_k_draws_only_the_k_likeliest(tiny, mixed_samples):
    """Only the 3 most likely tokens are drawn, in proportion to their renormalised
    probabilities."""
    probs, rollout = top3_draws(tiny[1], mixed_samples)
    assert probs.topk(3).values.sum() < 0.1  # without top-k, 9 draws in 10 would be other tokens
    top3 = probs.topk(3).indices
    drawn = rollout.completion_ids[:, 0]
    assert torch.isin(drawn, top3).all()
    counts = torch.bincount(drawn, minlength=probs.numel())[top3] / 4000
    assert (counts - probs[top3] / probs[top3].sum()).abs().max() < 0.03


def test_top_k_keeps_the_full_distributions_logprob(tiny, mixed_samples):
    probs, rollout = top3_draws(tiny[1], mixed_samples)
    drawn = rollout.completion_ids[:, 0]
    torch.testing.assert_close(rollout.logprobs[:, 0], probs.log()[drawn], rtol=0, atol=1e-5)


@pytest.mark.parametrize("uniform, banned, top_k, token", [
    (0.05, [], 0, 0), (0.25, [], 0, 1), (0.59, [], 0, 2), (0.95, [], 0, 3),
    # Token 3 banned: the rest renormalised to 1/6, 2/6, 3/6, so u = 0.95 draws token 2.
    (0.95, [3], 0, 2), (0.10, [3], 0, 0),
    # Top-2 keeps tokens 2 and 3 (3/7, 4/7): u = 0.05 draws token 2.
    (0.05, [], 2, 2), (0.50, [], 2, 3),
    # Greedy: the most likely token that is allowed.
    (None, [], 0, 3), (None, [3], 0, 2),
])
def test_draw_token_inverts_the_filtered_cdf(uniform, banned, top_k, token):
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    u = None if uniform is None else torch.tensor([uniform])
    drawn, logprob, entropy = sampler.draw_token(probs.log(), u, 1.0, 1.0, top_k,
                                                 torch.tensor(banned, dtype=torch.long))
    assert drawn.tolist() == [token]
    # By hand: the log-prob and entropy of the whole distribution, whatever was filtered.
    assert logprob.item() == pytest.approx(torch.log(probs[0, token]).item(), abs=1e-6)
    assert entropy.item() == pytest.approx(-(probs * probs.log()).sum().item(), abs=1e-6)


def test_top_k_filter_keeps_the_k_largest_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 5.0, 1.0]])
    assert sampler.top_k_filter(logits, 2).isfinite().tolist() == [[True, False, True, False],
                                                                   [False, True, True, False]]
    assert torch.equal(sampler.top_k_filter(logits, 0), logits)


def test_a_qwen2_vl_2b_style_folder_loads(tiny_path, tiny, mixed_samples, tmp_path):
    """Sharded safetensors with an index, chat_template.json, the real preprocessor_config keys."""
    model, processor = tiny
    folder = tmp_path / "Qwen2-VL-2B-Instruct"
    model.save_pretrained(folder, max_shard_size="500KB")
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    shutil.copy(tiny_path / "preprocessor_config.json", folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update({"min_pixels": 3136, "max_pixels": 12845056,
                   "processor_class": "Qwen2VLProcessor"})
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    assert (folder / "model.safetensors.index.json").exists()

    loaded = modellib.load_model(folder)
    loaded_processor = inputs.Processor.from_pretrained(folder, max_pixels=56 * 56)
    batch = encode(loaded_processor, mixed_samples, SIZES["different"])
    assert loaded_processor.tokenizer.chat_template == CHAT_TEMPLATE
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch.model_inputs()).logits,
                                   model(**batch.model_inputs()).logits)


def test_a_folder_without_processor_files_is_refused(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no processor files"):
        inputs.Processor.from_pretrained(tmp_path)


def test_an_fsdp2_checkpoint_reloads_to_the_same_logits(tiny, mixed_samples, tmp_path,
                                                        single_process_group):
    model, processor = tiny
    batch = encode(processor, mixed_samples, SIZES["different"])
    with torch.no_grad():
        expected = model(**batch.model_inputs()).logits
    modellib.shard(model, bf16=False)
    checkpoint.save(model, processor, tmp_path / "ckpt", {"train_config.json": {"lr": 1.0}})
    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert reloaded.generation_config.use_cache
    assert json.loads((tmp_path / "ckpt" / "train_config.json").read_text()) == {"lr": 1.0}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch.model_inputs()).logits, expected)


def test_bf16_training_gives_fp32_logprobs_and_grads(tiny, mixed_samples, single_process_group):
    model, processor = tiny
    batch = encode(processor, mixed_samples, SIZES["different"])
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, batch, 2, sampler.Decoding(8, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    expanded = repeat_prompts(batch, 2)
    ids, completion_mask = rollout.completion_ids, rollout.completion_mask
    with torch.no_grad():
        fp32 = modellib.token_logprobs(model, expanded, ids, completion_mask)
    modellib.shard(model, bf16=True)
    logprobs = modellib.token_logprobs(model, expanded, ids, completion_mask)
    assert logprobs.dtype == torch.float32
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logprobs[mask], fp32[mask], rtol=0, atol=0.25)  # bf16 has ~3 digits
    assert not torch.equal(logprobs[mask], fp32[mask])  # bf16 really was used
    (logprobs * mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and g.to_local().isfinite().all() for g in grads)


def test_the_pixel_budget_sets_the_visual_tokens(tiny_path):
    """Med-R1: 384 x 384 images and max_pixels 401408 give 196 visual tokens; the tiny
    default's budget gives 4."""
    processor = inputs.Processor.from_pretrained(tiny_path, max_pixels=401408)
    assert inputs.visual_tokens(processor, 384) == 196
    assert inputs.visual_tokens(inputs.Processor.from_pretrained(tiny_path), 384) == 4
    processor = inputs.Processor.from_pretrained(tiny_path, max_pixels=28 * 28)
    assert inputs.visual_tokens(processor, 384) == 1


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_sharing_the_prompt_changes_nothing(any_model, mixed_samples, single_process_group,
                                            grad_checkpointing):
    """Oracle: each completion run whole, with its own copy of the prompt, on an unsharded copy
    of the model.

    token_logprobs encodes each prompt once and runs the G completions on its
    repeated KV cache: two forward calls, one backward through both, under
    FSDP2; with gradient checkpointing, the completion pass is replayed in the
    backward pass on the same cache.
    """
    model, processor = any_model
    oracle = copy.deepcopy(model)
    batch = encode(processor, mixed_samples, SIZES["different"])
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, batch, 3, sampler.Decoding(12, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    weights = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    mask = rollout.completion_mask

    expected = modellib.token_logprobs(oracle, repeat_prompts(batch, 3), rollout.completion_ids,
                                       mask)
    (expected * weights * mask).sum().backward()
    checkpointed = []
    if grad_checkpointing:
        modellib.enable_grad_checkpointing(model)
        layer = model.model.language_model.layers[0]
        replay = layer._gradient_checkpointing_func

        def counted_replay(*args, **kwargs):
            checkpointed.append(1)
            return replay(*args, **kwargs)

        layer._gradient_checkpointing_func = counted_replay
    modellib.shard(model, bf16=False)
    shared = modellib.token_logprobs(model, batch, rollout.completion_ids, mask, group_size=3)
    (shared * weights * mask).sum().backward()
    assert len(checkpointed) == grad_checkpointing  # the completion pass only, never the prefill
    assert not model.training

    torch.testing.assert_close(shared[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)
    for (name, param), (_, reference) in zip(model.named_parameters(), oracle.named_parameters()):
        # Rounding differs in the summation order: allowed up to 1e-5 of the gradient's own scale.
        torch.testing.assert_close(param.grad.full_tensor(), reference.grad, rtol=1e-4,
                                   atol=1e-5 * reference.grad.abs().max().item(), msg=name)


def test_training_entropy_equals_the_samplers_and_shares_the_prompt(tiny, mixed_samples,
                                                                     single_process_group):
    """The entropy bonus's H (grpo.py, equation (5)): the training forward's equals the
    sampler's, computed token by token from the decoder's own logits (fp32, temperature 0.7),
    and with the prompt encoded once its values and gradients equal those of each completion
    run with its own copy of the prompt."""
    model, processor = tiny
    oracle = copy.deepcopy(model)
    batch = encode(processor, mixed_samples, SIZES["different"])
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, batch, 3, sampler.Decoding(12, 0.7, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    mask = rollout.completion_mask
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    _, expected = modellib.token_logprobs(oracle, repeat_prompts(batch, 3), rollout.completion_ids,
                                          mask, 0.7, with_entropy=True)
    (expected * weights * mask).sum().backward()
    modellib.shard(model, bf16=False)
    logprobs, entropy = modellib.token_logprobs(model, batch, rollout.completion_ids, mask, 0.7,
                                                group_size=3, with_entropy=True)
    (entropy * weights * mask).sum().backward()
    real = mask.bool()
    torch.testing.assert_close(logprobs[real], rollout.logprobs[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[real], rollout.entropy[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[real], expected[real], rtol=0, atol=1e-5)
    assert entropy[real].max() > 0.5  # some tokens are far from certain
    for (name, param), (_, reference) in zip(model.named_parameters(), oracle.named_parameters()):
        torch.testing.assert_close(param.grad.full_tensor(), reference.grad, rtol=1e-4,
                                   atol=1e-5 * reference.grad.abs().max().item(), msg=name)
