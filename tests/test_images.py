"""Several images per question, through data, sampler and the training forward, against
Hugging Face forwards of each row alone."""

import pytest
import torch

import data
import inputs
import model as modellib
import sampler
import sources

# Prompt 0 has two images, prompt 1 three, all of different sizes (width, height).
SIZES = [[(56, 56), (84, 28)], [(28, 84), (56, 28), (84, 84)]]
G = 2


@pytest.fixture
def samples(tmp_path, dataset_root):
    """Two questions of the synthetic data, each given several images of its own sizes."""
    questions = sources.load_omnimedvqa(dataset_root)[:2]
    result = []
    for q, (sample, sizes) in enumerate(zip(questions, SIZES)):
        paths = []
        for i, size in enumerate(sizes):
            path = tmp_path / f"{q}-{i}.png"
            inputs.load_image(sample["images"][0]).resize(size).rotate(90 * i).save(path)
            paths.append(str(path))
        result.append({**sample, "images": paths})
    return result


def one_row(batch: inputs.PromptBatch, row: int, completion: list[int]) -> inputs.PromptBatch:
    """Row `row` of a batch alone, its left padding dropped and completion appended."""
    alone = inputs.select_rows(batch, torch.tensor([row]))
    keep = alone.attention_mask[0].bool()
    ids = torch.cat([alone.input_ids[0][keep], torch.tensor(completion, dtype=torch.long)])[None]
    types = torch.nn.functional.pad(alone.mm_token_type_ids[0][keep], (0, len(completion)))[None]
    return inputs.PromptBatch(ids, torch.ones_like(ids), types, alone.pixel_values,
                              alone.image_grid_thw, alone.image_counts)


def test_each_prompt_carries_all_its_images_in_order(tiny, samples):
    _, processor = tiny
    batch = data.collate(samples, processor, "think-after")
    assert batch.image_counts.tolist() == [2, 3]
    assert batch.image_grid_thw.shape == (5, 3)
    merge = processor.image_processor.merge_size ** 2
    # Each prompt holds exactly its images' visual tokens.
    tokens = batch.image_grid_thw.prod(-1) // merge
    assert batch.mm_token_type_ids.sum(1).tolist() == [tokens[:2].sum(), tokens[2:].sum()]
    rows = torch.tensor([1, 1, 0, 1])
    picked = inputs.select_rows(batch, rows)
    blocks = batch.pixel_values.split(batch.image_grid_thw.prod(-1).tolist())
    images = [2, 3, 4, 2, 3, 4, 0, 1, 2, 3, 4]  # rows 1, 1, 0, 1: prompt 1 has images 2-4
    assert torch.equal(picked.pixel_values, torch.cat([blocks[i] for i in images]))
    assert torch.equal(picked.image_grid_thw, batch.image_grid_thw[images])
    assert picked.image_counts.tolist() == [3, 3, 2, 3]


def test_greedy_rows_equal_generate_on_each_prompt(any_model, samples):
    model, processor = any_model
    batch = data.collate(samples, processor, "think-after")
    assert (batch.attention_mask == 0).any(), "the prompts must differ in length to test padding"
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    ours = sampler.sample(model, batch, G, sampler.Decoding(10, temperature=0.0, end_ids=end_ids))
    for row in range(len(samples) * G):
        alone = one_row(batch, row // G, [])
        generated = model.generate(**alone.model_inputs(), max_new_tokens=10, do_sample=False,
                                   eos_token_id=end_ids, pad_token_id=end_ids[0])
        theirs = generated[0, alone.input_ids.shape[1]:]
        n = int(ours.completion_mask[row].sum())
        assert ours.completion_ids[row, :n].tolist() == theirs[:n].tolist()


def test_shared_prompts_match_each_row_run_alone(any_model, samples):
    """The prompt (and its images) encoded once for its G completions, against each completion
    run whole with its own prompt and images, as Hugging Face computes positions for it."""
    model, processor = any_model
    batch = data.collate(samples, processor, "think-after")
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    rollout = sampler.sample(model, batch, G, sampler.Decoding(8, end_ids=end_ids),
                             generator=torch.Generator().manual_seed(0))
    mask = rollout.completion_mask
    shared = modellib.token_logprobs(model, batch, rollout.completion_ids, mask, group_size=G)
    shared[mask.bool()].sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    total = 0
    for row in range(len(samples) * G):
        completion = rollout.completion_ids[row][mask[row].bool()].tolist()
        alone = one_row(batch, row // G, completion)
        logits = model(**alone.model_inputs()).logits[0].float().log_softmax(-1)
        P = alone.input_ids.shape[1] - len(completion)
        # Next-token shift: position P - 1 + t predicts completion token t.
        expected = torch.stack([logits[P - 1 + t, token] for t, token in enumerate(completion)])
        torch.testing.assert_close(shared[row][mask[row].bool()], expected.detach(),
                                   rtol=0, atol=1e-5)
        total = total + expected.sum()
    total.backward()
    assert ours.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if name in ours:
            torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_prompt_length_check_counts_every_image(tiny, samples):
    _, processor = tiny
    batch = data.collate(samples, processor, "think-after", image_size=56)
    lengths = batch.attention_mask.sum(1).tolist()
    data.check_prompts(samples, processor, "think-after", 56, 0, max(lengths) + 8, 8)
    message = f"1 prompts are longer than .* with {max(lengths)} tokens"
    with pytest.raises(data.DataError, match=message):
        data.check_prompts(samples, processor, "think-after", 56, 0, max(lengths) + 7, 8)
