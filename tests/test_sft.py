"""The supervised baseline: our answer-only SFT and Med-R1's released one (PROMPTS.md), the
learning-rate schedules, and gradient accumulation."""

import math

import pytest
import torch

import common
import data
import model as modellib
import train
from helpers import metrics, run

# Med-R1's SFT system turn, as PROMPTS.md quotes it.
SYSTEM = ("Your task: Provide the correct single-letter choice (A, B, C, D,...) inside "
          "<answer>...</answer> tags.")


@pytest.fixture
def two_records(dataset_root):
    """Two multiple-choice records with an image each, written out here."""
    images = sorted(str(p) for p in (dataset_root / "Images").rglob("*.png"))[:2]
    return [
        {"id": "a", "images": [images[0]], "question": "Which organ?",
         "options": {"A": "Liver", "B": "Lung"}, "answer": "B", "answer_type": "choice",
         "modality": "CT", "question_type": ""},
        {"id": "b", "images": [images[1]], "question": "Is it an MRI?",
         "options": {"A": "Yes", "B": "No", "C": "Maybe"}, "answer": "A",
         "answer_type": "choice", "modality": "MRI", "question_type": ""},
    ]


# The text whose tokens carry loss, per record, written from PROMPTS.md's facts. Ours: the
# answer tag and the end of the turn. Med-R1's: the whole conversation (its system turn, the
# text before the image, "None" for the missing thinking, the spaced answer tag, and the
# empty assistant header that add_generation_prompt=True appends), but for the image tokens
# and the first token, which nothing predicts.
LOSS_TEXT = {
    "answer": ["<answer>B</answer><|im_end|>", "<answer>A</answer><|im_end|>"],
    "medr1": [
        f"system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhich organ? A)Liver, B)Lung"
        "<|vision_start|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
        "None\n\n<answer> B </answer><|im_end|>\n<|im_start|>assistant\n",
        f"system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nIs it an MRI? A)Yes, B)No, C)Maybe"
        "<|vision_start|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
        "None\n\n<answer> A </answer><|im_end|>\n<|im_start|>assistant\n",
    ],
}


def loss_tokens(sft_format, model, processor, records, monkeypatch) -> list[list[int]]:
    """Each record's tokens that carry loss in a format, as train.sft_iteration computes it."""
    if sft_format == "medr1":
        batch, loss_mask = data.medr1_sft_batch(records, processor, 56)
        return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, loss_mask)]
    seen = {}
    real = modellib.token_logprobs

    def recording(model, prompts, completion_ids, completion_mask, *args, **kwargs):
        """The real token_logprobs, keeping the completions it scores."""
        seen["ids"], seen["mask"] = completion_ids, completion_mask
        return real(model, prompts, completion_ids, completion_mask, *args, **kwargs)

    monkeypatch.setattr(modellib, "token_logprobs", recording)
    prompts = data.collate(records, processor, "think-after", 56)
    targets = [f"<answer>{r['answer']}</answer>" for r in records]
    modellib.sft_nll(model, processor.tokenizer, prompts, targets)
    return [ids[mask.bool()].tolist() for ids, mask in zip(seen["ids"], seen["mask"])]


@pytest.mark.parametrize("sft_format", ["answer", "medr1"])
def test_sft_formats_put_loss_on_the_text_of_prompts_md(sft_format, tiny, two_records,
                                                        monkeypatch):
    model, processor = tiny
    tokens = loss_tokens(sft_format, model, processor, two_records, monkeypatch)
    texts = [processor.tokenizer.decode(ids) for ids in tokens]
    assert texts == LOSS_TEXT[sft_format]


def test_medr1_sft_loss_is_the_nll_of_its_masked_tokens(tiny, two_records):
    """Oracle: each row alone, its full forward's next-token log-probs at the masked tokens."""
    model, processor = tiny
    batch, loss_mask = data.medr1_sft_batch(two_records, processor, 56)
    nll, count = modellib.sequence_nll(model, batch, loss_mask)
    expected = 0.0
    for row, record in enumerate(two_records):
        alone, mask = data.medr1_sft_batch([record], processor, 56)
        logits = model(**alone.model_inputs()).logits[0].float().log_softmax(-1)  # (P, V)
        ids, mask = alone.input_ids[0], mask[0]
        # Next-token shift: position p - 1 predicts token p.
        expected -= sum(logits[p - 1, ids[p]] for p in range(1, len(ids)) if mask[p])
    assert count == int(loss_mask.sum())
    torch.testing.assert_close(nll, expected.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("update, total, schedule, warmup_ratio, factor", [
    # Linear, no warm-up (the default): 1 - 3 / 10.
    (3, 10, "linear", 0.0, 0.7),
    # Warm-up over ceil(0.2 x 10) = 2 updates: 1 / 2; then 1 - (6 - 2) / (10 - 2).
    (1, 10, "linear", 0.2, 0.5), (6, 10, "linear", 0.2, 0.5),
    # Med-R1's SFT: cosine after ceil(0.1 x 10) = 1 warm-up update, from 0.
    (0, 10, "cosine", 0.1, 0.0), (1, 10, "cosine", 0.1, 1.0),
    # (1 + cos(pi x 4 / 9)) / 2, cos(80 degrees) = 0.1736481777.
    (5, 10, "cosine", 0.1, 0.5868240888), (10, 10, "cosine", 0.1, 0.0),
])
def test_learning_rate_factor_matches_hand_values(update, total, schedule, warmup_ratio, factor):
    assert common.lr_factor(update, total, schedule, warmup_ratio) == pytest.approx(factor)


def test_sft_switches_are_refused_with_grpo():
    for changes in ({"sft_format": "medr1"}, {"accumulation_steps": 2}):
        with pytest.raises(SystemExit, match="are --algo sft's"):
            train.resolve(train.Config(**changes), world=1)


def test_accumulated_passes_give_one_pass_update(tiny_path, tmp_path):
    """Two passes of two prompts per step make the same steps as one pass of four: the loss is
    the mean over the step's tokens either way. With a 50% warm-up the first lr is 0."""
    for passes in (1, 2):
        run(["train.py", "--algo", "sft", "--sft_format", "medr1", "--steps", "2",
             "--lr", "1e-4", "--lr_schedule", "cosine", "--warmup_ratio", "0.5",
             "--prompts_per_step", "4", "--accumulation_steps", str(passes),
             "--eval_every", "0", "--eval_size", "4", "--output_dir", str(tmp_path / str(passes))])
    one, two = metrics(tmp_path / "1"), metrics(tmp_path / "2")
    assert [m["lr"] for m in one] == [m["lr"] for m in two] == [0.0, 1e-4]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert math.isfinite(a["loss"]) and a["loss"] > 0
