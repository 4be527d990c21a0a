"""Qwen2-VL's real tokenizer and vocabulary (tests/qwen_tokenizer.py builds them): the tokenizer
against published facts, then the pipeline on a toy model with the real 151,936-row embedding."""

import json
import math

import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from helpers import SMALL, encode, run
from qwen_tokenizer import RANKS, build_qwen2_vl_folder

import data
import inputs
import model as modellib
import sampler

# Qwen2-VL's special tokens and their ids, as its published tokenizer_config.json lists them.
PUBLISHED_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
    "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
# Qwen2's pre-tokenizer pattern, as published (digits one by one), for the tiktoken oracle.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Digits, decimals, units, ranges and non-ASCII letters, as a radiology report writes them.
MEDICAL_TEXT = ("Befund: 3,5 × 2,1 cm Läsion im Segment VII; SUV_max 12.4 g/mL, "
                "Hb 13.5 g/dL (Ref. 12–16), T = 38.2 °C, 5×10⁹/L, 40 µm, 1.2 mm², "
                "β-HCG < 5 IU/L, naïve, Ödem, 肺结节 8 mm.\n\tFollow-up in 3–6 months; "
                "it's the patient's 2nd scan.")


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory):
    return build_qwen2_vl_folder(tmp_path_factory.mktemp("qwen2-vl-toy"))


@pytest.fixture(scope="session")
def processor(qwen_folder):
    return inputs.Processor.from_pretrained(qwen_folder)


@pytest.fixture
def qwen_model(qwen_folder):
    """A fresh fp32 copy of the toy model, as train.py and eval.py load it."""
    return modellib.load_model(qwen_folder).eval()


# ---------------------------------------------------------------- the tokenizer


def test_hello_is_token_9707(processor):
    assert processor.tokenizer("Hello")["input_ids"] == [9707]


def test_im_end_in_text_is_its_one_special_token(processor):
    assert processor.tokenizer("<|im_end|>")["input_ids"] == [151645]


def test_special_tokens_have_their_published_ids(processor):
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in PUBLISHED_IDS}
    assert ids == PUBLISHED_IDS


def test_the_default_system_turn_encodes_to_qwens_published_ids(processor):
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    # <|im_start|> system \n You " are" " a" " helpful" " assistant" . <|im_end|> \n
    expected = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert processor.tokenizer(text)["input_ids"] == expected


def test_digits_are_encoded_one_by_one(processor):
    # A printable ASCII byte's rank is its code less 33 ("!" is rank 0): "0" is 48 - 33 = 15.
    assert processor.tokenizer("2024")["input_ids"] == [17, 15, 17, 19]


def test_medical_text_round_trips_exactly(processor):
    tokenizer = processor.tokenizer
    assert tokenizer.decode(tokenizer(MEDICAL_TEXT)["input_ids"]) == MEDICAL_TEXT


def test_medical_text_encodes_as_tiktoken_does_over_the_same_ranks(processor):
    """Oracle: tiktoken, the ranks' own BPE implementation, with Qwen2's pattern."""
    encoding = tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN,
                                 mergeable_ranks=load_tiktoken_bpe(str(RANKS)), special_tokens={})
    expected = encoding.encode(MEDICAL_TEXT)
    assert len(expected) > 60
    assert processor.tokenizer(MEDICAL_TEXT)["input_ids"] == expected


def test_chat_template_renders_a_medr1_prompt_as_written_by_hand(processor):
    sample = {"question": "What imaging modality was used to capture this image?",
              "options": {"A": "CT", "B": "MRI", "C": "X-Ray", "D": "Ultrasound"},
              "images": ["ct.png"]}
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "What imaging modality was used to capture this image? A)CT, B)MRI, C)X-Ray, D)Ultrasound"
        " Your task: 1. Think through the question step by step, enclose your reasoning process"
        " in <think>...</think> tags. 2. Then provide the correct single-letter choice"
        " (A, B, C, D,...) inside <answer>...</answer> tags. 3. No extra information or text"
        " outside of these tags.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert data.chat_text(processor.tokenizer, sample, "think-before") == expected


# ---------------------------------------------------------------- the folder and the pipeline


def test_the_embedding_has_151936_rows_for_151657_tokens(processor, qwen_model):
    assert len(processor.tokenizer) == 151643 + 14
    assert qwen_model.get_input_embeddings().weight.shape[0] == 151936


def test_a_384_pixel_image_becomes_196_visual_tokens(processor):
    # smart_resize: 384 -> 392 = 28 patches of 14 a side, merged 2 x 2: 14 x 14 tokens.
    assert inputs.visual_tokens(processor, 384) == 196


def test_prompt_length_check_counts_every_token_the_model_sees(processor, mixed_samples):
    """Oracle: the length of the prompt as the processor hands it to the model."""
    sample = mixed_samples[0]
    text = data.chat_text(processor.tokenizer, sample, "think-after")
    length = processor([text], [inputs.load_image(sample["images"][0], 384)])["input_ids"].shape[1]
    assert length > 196 + 60
    data.check_prompts([sample], processor, "think-after", 384, 0, length + 12, 12)
    with pytest.raises(data.DataError, match=f"with {length} tokens"):
        data.check_prompts([sample], processor, "think-after", 384, 0, length + 11, 12)


def test_end_tokens_are_im_end_and_endoftext(processor, qwen_model):
    assert sampler.end_token_ids(qwen_model, processor.tokenizer) == [151643, 151645]


def test_sampler_draws_no_id_the_tokenizer_cannot_decode_nor_a_vision_token(
        processor, qwen_model, mixed_samples):
    """The embedding's 279 rows past the tokenizer and the vision tokens get a large bonus: a
    model that would emit them. decoding_for must keep every one of them out."""
    unusable = list(range(len(processor.tokenizer), 151936))
    unusable += processor.tokenizer.convert_tokens_to_ids(sampler.VISION_TOKENS)
    head = qwen_model.lm_head

    class PreferUnusableTokens(torch.nn.Module):
        def forward(self, hidden):
            logits = head(hidden)
            logits[..., unusable] += 50.0
            return logits

    qwen_model.lm_head = PreferUnusableTokens()
    batch = encode(processor, mixed_samples, [(56, 56)] * 3)
    decoding = sampler.decoding_for(qwen_model, processor.tokenizer, max_new_tokens=4)
    unbanned = sampler.sample(qwen_model, batch, 2, sampler.Decoding(4),
                              generator=torch.Generator().manual_seed(0))
    assert torch.isin(unbanned.completion_ids, torch.tensor(unusable)).all()
    rollout = sampler.sample(qwen_model, batch, 2, decoding,
                             generator=torch.Generator().manual_seed(0))
    assert not torch.isin(rollout.completion_ids, torch.tensor(unusable)).any()


def test_greedy_sampler_equals_generate_on_the_real_vocabulary(
        processor, qwen_model, mixed_samples):
    batch = encode(processor, mixed_samples, [(56, 56), (84, 28), (28, 140)])
    assert (batch.attention_mask == 0).any(), "the batch must be left-padded to test padding"
    end_ids = sampler.end_token_ids(qwen_model, processor.tokenizer)
    ours = sampler.sample(qwen_model, batch, 1,
                          sampler.Decoding(12, temperature=0.0, end_ids=end_ids))
    theirs = qwen_model.generate(**batch.model_inputs(), max_new_tokens=12, do_sample=False,
                                 eos_token_id=end_ids, pad_token_id=end_ids[0])
    theirs = theirs[:, batch.input_ids.shape[1]:]
    for row in range(len(mixed_samples)):
        n = int(ours.completion_mask[row].sum())
        assert ours.completion_ids[row, :n].tolist() == theirs[row, :n].tolist()
        assert n == theirs.shape[1] or theirs[row, n - 1].item() in end_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_training_forward_on_the_real_vocabulary(
        processor, qwen_model, mixed_samples, temperature):
    batch = encode(processor, mixed_samples, [(56, 56), (84, 28), (28, 140)])
    decoding = sampler.decoding_for(qwen_model, processor.tokenizer, 16, temperature)
    rollout = sampler.sample(qwen_model, batch, 3, decoding,
                             generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(mixed_samples)).repeat_interleave(3)
    with torch.no_grad():
        logprobs = modellib.token_logprobs(qwen_model, inputs.select_rows(batch, rows),
                                           rollout.completion_ids, rollout.completion_mask,
                                           temperature)
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 3 * len(mixed_samples)
    torch.testing.assert_close(logprobs[mask], rollout.logprobs[mask], rtol=0, atol=1e-5)


def test_grpo_trains_on_the_folder_and_eval_reads_its_checkpoint(qwen_folder, tmp_path):
    run(["train.py", "--model", str(qwen_folder), "--steps", "2", "--output_dir",
         str(tmp_path / "run"), *SMALL])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]
    run(["eval.py", "--checkpoints", str(tmp_path / "run" / "final"), "--max_samples", "2",
         "--max_new_tokens", "16", "--output", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    [trained] = [row for name, row in results.items() if name != "random guess"]
    assert trained["overall"]["questions"] == 8 * 2


def test_sft_starts_at_the_loss_of_a_uniform_guess_over_the_real_vocabulary(qwen_folder, tmp_path):
    """A random toy model's next-token distribution is nearly uniform: its first loss is close
    to ln(151,936) = 11.93, the loss of a uniform guess over every embedding row."""
    run(["train.py", "--model", str(qwen_folder), "--algo", "sft", "--steps", "2", "--output_dir",
         str(tmp_path), *SMALL])
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(151936), abs=0.1)
