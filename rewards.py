"""Prompt modes and rule rewards: plain functions (completion, sample) -> float, registered by name.

A prompt mode is what the model is asked to write (the template after the
image) and the layout its whole answer must have (the format reward). A reward
sees the decoded completion text (never token ids: the tiny BPE merges ">B"
into one token) and the sample dict from data.py, which carries the gold
`answer` letter, the `options` (letter -> text) and, added by `score`, the
prompt `mode` it was asked in.

To add a reward: write one function, add one line to REWARDS, add rows to the
table in tests/test_rewards.py. To add a prompt mode: one entry in MODES. This
file does not import torch.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptMode:
    """What the model is asked to write, and the layout that the format reward checks."""

    template: str  # the user text after the image; {problem} is the question with its options
    layout: re.Pattern | None = None  # the whole stripped completion must match; None: eval only
    example: str = ""  # an answer in this layout from {letter} and {reason} (the tiny warm-up)


# think-before and no-think are Med-R1's released training templates and format
# regexes, verbatim; think-after is ours, their mirror image (answer first, then
# the rationale). The last three are Med-R1's released evaluation wordings, which
# differ from its training templates.
MODES = {
    "think-after": PromptMode(
        "{problem} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) "
        "inside <answer>...</answer> tags. 2. Then explain your reasoning briefly, enclosed in "
        "<think>...</think> tags. 3. No extra information or text outside of these tags.",
        re.compile(r"<answer>.*?</answer>\s*<think>.*?</think>", re.DOTALL),
        "<answer>{letter}</answer><think>{reason}</think>"),
    "think-before": PromptMode(
        "{problem} Your task: 1. Think through the question step by step, enclose your reasoning "
        "process in <think>...</think> tags. 2. Then provide the correct single-letter choice "
        "(A, B, C, D,...) inside <answer>...</answer> tags. 3. No extra information or text "
        "outside of these tags.",
        re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL),
        "<think>{reason}</think><answer>{letter}</answer>"),
    "no-think": PromptMode(
        "{problem} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) "
        "inside <answer>...</answer> tags. 2. No extra information or text outside of this tag.",
        re.compile(r"<answer>.*?</answer>", re.DOTALL),
        "<answer>{letter}</answer>"),
    "medr1-eval-think": PromptMode(
        "{problem} Think through the question step by step in <think>...</think> tags. Then "
        "provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> "
        "tags."),
    "medr1-eval-no-think": PromptMode(
        "{problem} Provide the correct single-letter choice (A, B, C, D,...) inside "
        "<answer>...</answer> tags."),
    "zero-shot": PromptMode("{problem} Provide the correct single-letter choice (A, B, C, D,...)."),
}
# The modes a model can be trained in: those with a layout for the format reward.
TRAINING_MODES = [name for name, mode in MODES.items() if mode.layout]

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
    by_text = [L for L, text in options.items() if text.strip().lower() == content.lower()]
    return by_text[0] if len(by_text) == 1 else None


def format_reward(completion: str, sample: dict) -> float:
    """1 if the whole completion follows the prompt mode's tag layout, else 0."""
    return float(MODES[sample["mode"]].layout.fullmatch(completion.strip()) is not None)


def accuracy_reward(completion: str, sample: dict) -> float:
    """1 if the letter in the last <answer> tag is the gold letter, else 0."""
    return float(extract_choice(completion, sample["options"]) == sample["answer"])


# Med-R1's training reward as released: the first tag, on one line (no DOTALL), compared as is.
FIRST_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>")


def medr1_reward_choice(text: str) -> str:
    """The stripped content of the first one-line <answer> tag, or else the whole stripped text."""
    match = FIRST_ANSWER_TAG.search(text)
    return (match.group(1) if match else text).strip()


def accuracy_medr1_reward(completion: str, sample: dict) -> float:
    """Med-R1's training reward: medr1_reward_choice must be exactly the letter ("C." scores 0)."""
    return float(medr1_reward_choice(completion) == sample["answer"])


# Med-R1's released evaluation of think prompts: the first tag holding one word.
MEDR1_EVAL_TAG = re.compile(r"<answer>\s*(\w+)\s*</answer>")


def accuracy_medr1_think(completion: str, sample: dict) -> float:
    """Med-R1's think evaluation: the first <answer> tag holding one word must be the letter."""
    match = MEDR1_EVAL_TAG.search(completion)
    return float(match is not None and match.group(1) == sample["answer"])


def accuracy_medr1_raw(completion: str, sample: dict) -> float:
    """Med-R1's no-think and zero-shot evaluation (Qwen2-VL): the raw output must be the letter."""
    return float(completion == sample["answer"])


REWARDS = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "accuracy_medr1_reward": accuracy_medr1_reward,
    "accuracy_medr1_think": accuracy_medr1_think,
    "accuracy_medr1_raw": accuracy_medr1_raw,
}


def score(completions: list[str], samples: list[dict], names: list[str], mode: str) -> list[list]:
    """One row per completion, one column per reward name, each sample seen with its prompt mode."""
    table = []
    for completion, sample in zip(completions, samples):
        sample = {**sample, "mode": mode}
        row = []
        for name in names:
            try:
                row.append(float(REWARDS[name](completion, sample)))
            except Exception as error:
                raise RuntimeError(f"reward {name!r} failed on sample {sample['id']!r}: "
                                   f"{error!r}") from error
        table.append(row)
    return table
