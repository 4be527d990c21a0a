"""Rule rewards: plain functions (completion, sample) -> float, registered by name.

A reward sees the decoded completion text (never token ids: the tiny BPE merges
">B" into one token) and the sample dict from data.py, which carries the gold
`answer` letter, the `options` (letter -> text) and the prompt `mode`.

To add a reward: write one function, add one line to REWARDS, add rows to the
table in tests/test_rewards.py. This file does not import torch.
"""

import re

# The whole completion (stripped) must match its prompt mode's pattern.
# think-before and no-think are Med-R1's released regexes; think-after is their
# mirror image (answer first, then the rationale).
FORMATS = {
    "think-after": re.compile(r"<answer>.*?</answer>\s*<think>.*?</think>", re.DOTALL),
    "think-before": re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL),
    "no-think": re.compile(r"<answer>.*?</answer>", re.DOTALL),
}

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "B", "b", "B.", "(B)", "B)", "B:" alone.
LONE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.):]?")
# "B) text", "B. text", "(B) text": a letter marked as an option label, then text.
LABELLED_LETTER = re.compile(r"\(?([A-Za-z])[.):]\s+\S.*", re.DOTALL)
# What a model writes around its answer: markdown emphasis, code quotes, an "Answer:" label.
EMPHASIS = "*_`"
ANSWER_LABEL = re.compile(r"^(?:final\s+)?answer(?:\s*[:-]|\s+is\b:?)\s*", re.IGNORECASE)


def extract_choice(text: str, options: dict) -> str | None:
    """The option letter chosen in the last <answer> tag, or None if it is ambiguous.

    With no tag at all the whole completion is read by the same rules (a model
    asked zero-shot answers "B" or "B) MRI"); prose around a letter is not.
    """
    tags = ANSWER_TAG.findall(text)
    content = ANSWER_LABEL.sub("", (tags[-1] if tags else text).strip().strip(EMPHASIS).strip())
    content = content.strip(EMPHASIS).strip()
    # A bare word such as "a" in prose never reaches here as a letter: the
    # patterns need the whole tag content to be the letter, or a labelled letter.
    match = LONE_LETTER.fullmatch(content) or LABELLED_LETTER.fullmatch(content)
    if match:
        letter = match.group(1).upper()
        # "A) CT or B) MRI" names two options: ambiguous, so no choice.
        others = re.search(rf"\b[{''.join(options)}]\b", content[match.end(1):])
        return letter if letter in options and not others else None
    by_text = [letter for letter, option in options.items() if option.strip().lower() == content.lower()]
    return by_text[0] if len(by_text) == 1 else None


def format_reward(completion: str, sample: dict) -> float:
    """1 if the whole completion follows the prompt mode's tag layout, else 0."""
    return float(FORMATS[sample["mode"]].fullmatch(completion.strip()) is not None)


def accuracy_reward(completion: str, sample: dict) -> float:
    """1 if the letter in the last <answer> tag is the gold letter, else 0."""
    return float(extract_choice(completion, sample["options"]) == sample["answer"])


# Med-R1's training reward as released: the first tag, on one line (no DOTALL), compared as is.
FIRST_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>")


def medr1_reward_choice(text: str) -> str:
    """The stripped content of the first one-line <answer> tag, or the whole stripped text if there is none."""
    match = FIRST_ANSWER_TAG.search(text)
    return (match.group(1) if match else text).strip()


def accuracy_medr1_reward(completion: str, sample: dict) -> float:
    """1 if medr1_reward_choice is exactly the gold letter ("C." and "c" score 0): Med-R1's training reward."""
    return float(medr1_reward_choice(completion) == sample["answer"])


# Med-R1's released evaluation of think prompts: the first tag holding one word.
MEDR1_EVAL_TAG = re.compile(r"<answer>\s*(\w+)\s*</answer>")


def accuracy_medr1_think(completion: str, sample: dict) -> float:
    """Med-R1's think evaluation: the first <answer> tag holding one word must be the gold letter; no tag: 0."""
    match = MEDR1_EVAL_TAG.search(completion)
    return float(match is not None and match.group(1) == sample["answer"])


def accuracy_medr1_raw(completion: str, sample: dict) -> float:
    """Med-R1's no-think and zero-shot evaluation (Qwen2-VL): the raw output, unstripped, must be the gold letter."""
    return float(completion == sample["answer"])


REWARDS = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "accuracy_medr1_reward": accuracy_medr1_reward,
}
