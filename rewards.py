"""Prompt modes and rule rewards: plain functions (completion, sample) -> float, registered by name.

A prompt mode is what the model is asked to write (the template after the
images) and the layout its whole answer must have (the format reward). A reward
sees the decoded completion text (never token ids: the tiny BPE merges ">B"
into one token) and the sample dict from data.py, which carries the gold
`answer`, the `options` (letter -> text) and, added by `score`, the prompt
`mode` it was asked in.

A sample's `answer_type` (missing means "choice") says what its gold is:
  choice  the gold letter of one of the options (OmniMedVQA, as in Med-R1);
  closed  no options, a short gold text, mostly "yes" or "no" (VQA-RAD, SLAKE, PathVQA);
  open    no options, a free-text gold such as "left lung".
`accuracy` scores choice by the letter, closed by closed_accuracy (yes/no read
from the answer's first word) and open by normalised exact_match; token_recall
and token_f1 give open answers partial credit.
Med-R1's released scorers (accuracy_medr1_*) and MedEvalKit's
(accuracy_medevalkit) are here too, as written, to give the numbers their papers report.

To add a reward: one function, one line in REWARDS, rows in tests/test_rewards.py's
table. To add a prompt mode: one entry in MODES. This file does not import torch.
"""

import re
import string
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher


# What the answer tag must hold, by answer type. Closed and open questions share
# one wording so that the prompt never tells the model that the gold is yes or no.
TASKS = {
    "choice": "the correct single-letter choice (A, B, C, D,...)",
    "closed": "the answer as a single word or short phrase",
    "open": "the answer as a single word or short phrase",
}


@dataclass(frozen=True)
class PromptMode:
    """What the model is asked to write, and the layout that the format reward checks."""

    template: str  # the user text after the images, from {problem} and {task} (TASKS)
    layout: re.Pattern | None = None  # the whole stripped completion must match; None: eval only
    example: str = ""  # an answer in this layout from {letter} and {reason} (the tiny warm-up)

    def text(self, problem: str, answer_type: str) -> str:
        """The template for a problem (the question with its options) and its answer type."""
        return self.template.format(problem=problem, task=TASKS[answer_type])


# think-before and no-think are Med-R1's released training templates and format
# regexes, verbatim (with TASKS["choice"] as the task); think-after is ours, their
# mirror image (answer first, then the rationale). The last three are Med-R1's
# released evaluation wordings, which differ from its training templates.
MODES = {
    "think-after": PromptMode(
        "{problem} Your task: 1. Provide {task} inside <answer>...</answer> tags. 2. Then "
        "explain your reasoning briefly, enclosed in <think>...</think> tags. 3. No extra "
        "information or text outside of these tags.",
        re.compile(r"<answer>.*?</answer>\s*<think>.*?</think>", re.DOTALL),
        "<answer>{letter}</answer><think>{reason}</think>"),
    "think-before": PromptMode(
        "{problem} Your task: 1. Think through the question step by step, enclose your reasoning "
        "process in <think>...</think> tags. 2. Then provide {task} inside <answer>...</answer> "
        "tags. 3. No extra information or text outside of these tags.",
        re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL),
        "<think>{reason}</think><answer>{letter}</answer>"),
    "no-think": PromptMode(
        "{problem} Your task: 1. Provide {task} inside <answer>...</answer> tags. 2. No extra "
        "information or text outside of this tag.",
        re.compile(r"<answer>.*?</answer>", re.DOTALL),
        "<answer>{letter}</answer>"),
    "medr1-eval-think": PromptMode(
        "{problem} Think through the question step by step in <think>...</think> tags. Then "
        "provide {task} inside <answer>...</answer> tags."),
    "medr1-eval-no-think": PromptMode("{problem} Provide {task} inside <answer>...</answer> tags."),
    "zero-shot": PromptMode("{problem} Provide {task}."),
}
# The modes a model can be trained in: those with a layout for the format reward.
TRAINING_MODES = tuple(name for name, mode in MODES.items() if mode.layout)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "B", "b", "B.", "(B)", "B)", "B:" alone.
LONE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.):]?")
# "B) text", "B. text", "(B) text", and "B)text" as the prompt lists options: a letter
# marked as an option label, then text.
LABELLED_LETTER = re.compile(r"\(?([A-Za-z])(?:\)\s*|[.:]\s+)(\S.*)", re.DOTALL)
# What a model writes around its answer: markdown emphasis, code quotes, an "Answer:" label.
EMPHASIS = "*_`"
ANSWER_LABEL = re.compile(r"^(?:final\s+)?answer(?:\s*[:-]|\s+is\b:?)\s*", re.IGNORECASE)


def answer_text(completion: str) -> str:
    """The content of the last <answer> tag (or the whole completion without one), stripped of
    surrounding whitespace, markdown emphasis and an "Answer:" label."""
    tags = ANSWER_TAG.findall(completion)
    content = (tags[-1] if tags else completion).strip().strip(EMPHASIS).strip()
    return ANSWER_LABEL.sub("", content).strip(EMPHASIS).strip()


def extract_choice(text: str, options: dict) -> str | None:
    """The option letter chosen in the last <answer> tag, or None if it is ambiguous.

    With no tag at all the whole completion is read by the same rules (a model
    asked zero-shot answers "B" or "B) MRI"); prose around a letter is not.
    """
    if not options:
        return None  # a question without options has no letter to choose
    content = answer_text(text)
    # A bare word such as "a" in prose never reaches here as a letter: the
    # patterns need the whole tag content to be the letter, or a labelled letter.
    match = LONE_LETTER.fullmatch(content) or LABELLED_LETTER.fullmatch(content)
    if match:
        letter = match.group(1).upper()
        if letter not in options:
            return None
        # "B) Hepatitis A" is option B's own text, whatever letters it holds.
        own_text = match.group(2) if match.lastindex == 2 else None
        if own_text and own_text.strip().lower() == options[letter].strip().lower():
            return letter
        # "A) CT or B) MRI" names two options: ambiguous, so no choice.
        others = re.search(rf"\b[{''.join(options)}]\b", content[match.end(1):])
        return None if others else letter
    by_text = [L for L, text in options.items() if text.strip().lower() == content.lower()]
    return by_text[0] if len(by_text) == 1 else None


PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, ASCII punctuation replaced by spaces, the words a/an/the
    removed (unless nothing else is left), whitespace collapsed to single spaces."""
    # Punctuation becomes a space rather than nothing, so that "T2-weighted"
    # matches a gold "t2 weighted" (SQuAD's own script would make it "t2weighted").
    words = PUNCTUATION.sub(" ", text.lower()).split()
    # A gold "A" (an option named in the question) stays a word an empty answer cannot match.
    return " ".join([w for w in words if w not in ARTICLES] or words)


def is_yes_no(text: str) -> bool:
    """Whether the text is, once normalised, the word yes or the word no."""
    return normalize_answer(text) in ("yes", "no")


def yes_no(text: str) -> str | None:
    """The string "yes" or "no" if the normalised text is or starts with that word, else None."""
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def answer_type(sample: dict) -> str:
    """The sample's answer type: "choice", "closed" or "open" (choice when it has none)."""
    return sample.get("answer_type", "choice")


def choice_accuracy(completion: str, sample: dict) -> float:
    """1 if the letter in the last <answer> tag is the gold letter, else 0."""
    return float(extract_choice(completion, sample["options"]) == sample["answer"])


# On a choice sample every text metric below is the letter's correctness, so
# that any of them can be the training reward on a mix of answer types.


def closed_accuracy(completion: str, sample: dict) -> float:
    """A gold yes/no must be yes_no of the answer ("Yes, a mass" is yes); any other gold
    (SLAKE's "Which is bigger, liver or spleen?") must match it after normalize_answer."""
    if answer_type(sample) == "choice":
        return choice_accuracy(completion, sample)
    if is_yes_no(sample["answer"]):
        return float(yes_no(answer_text(completion)) == normalize_answer(sample["answer"]))
    return exact_match(completion, sample)


def exact_match(completion: str, sample: dict) -> float:
    """1 if answer_text equals the gold after normalize_answer on both, else 0."""
    if answer_type(sample) == "choice":
        return choice_accuracy(completion, sample)
    return float(normalize_answer(answer_text(completion)) == normalize_answer(sample["answer"]))


def answer_tokens(completion: str, sample: dict) -> tuple[list[str], list[str]]:
    """The normalised words of the prediction's answer_text and of the gold."""
    pred = normalize_answer(answer_text(completion)).split()
    return pred, normalize_answer(sample["answer"]).split()


def token_recall(completion: str, sample: dict) -> float:
    """The share of the gold's distinct normalised words found among the prediction's words
    (the "recall" that LLaVA-Med and PMC-VQA report for open questions)."""
    if answer_type(sample) == "choice":
        return choice_accuracy(completion, sample)
    pred, gold = answer_tokens(completion, sample)
    # A gold with no words left after normalising is matched only by an empty answer.
    if not gold:
        return float(not pred)
    return len(set(gold) & set(pred)) / len(set(gold))


def token_f1(completion: str, sample: dict) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the normalised words
    shared as a multiset; 0 when one side is empty, 1 when both are."""
    if answer_type(sample) == "choice":
        return choice_accuracy(completion, sample)
    pred, gold = answer_tokens(completion, sample)
    if not pred or not gold:
        return float(pred == gold)
    shared = sum((Counter(pred) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def format_reward(completion: str, sample: dict) -> float:
    """1 if the whole completion follows the prompt mode's tag layout, else 0."""
    return float(MODES[sample["mode"]].layout.fullmatch(completion.strip()) is not None)


# The accuracy of each answer type: open answers by exact match, since partial
# credit (token_recall, token_f1) is a choice to make by name.
ACCURACY_BY_TYPE = {"choice": choice_accuracy, "closed": closed_accuracy, "open": exact_match}


def accuracy_reward(completion: str, sample: dict) -> float:
    """The letter for choice questions, closed_accuracy for closed ones, exact_match for open."""
    return ACCURACY_BY_TYPE[answer_type(sample)](completion, sample)


# Med-R1's scorers were written for a gold letter. On closed and open samples
# they compare the same way against the gold text: an exact, case-sensitive
# string match ("Yes" scores 0 against "yes"), kept as is rather than patched.
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


# MedEvalKit (github.com/alibaba-damo-academy/MedEvalKit), Lingshu's harness, restated from
# its utils/utils.py (parse_response, judge_*) and utils/{OmniMedVQA,MedXpertQA,VQA_RAD,
# PATH_VQA,SLAKE}/*.py as the forks chenz53/, mi-iro/ and blackkiring/MedEvalKit agree on
# them. Its quirks are kept: the point is to give the numbers it gives.
# The labels it reads an answer after, tried in this order; each cuts at its last occurrence.
MEDEVALKIT_LABELS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is",
                     "answer:", "答案:", "final answer", "final answer is")


def boxed_content(text: str) -> str | None:
    """The stripped content of the last \\boxed{...}, braces balanced (mathruler's
    extract_boxed_content, which MedEvalKit calls); None without a closed one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, body = 0, text[start + len("\\boxed{"):]
    for i, char in enumerate(body):
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return body[:i].strip()
    return None


def answer_tags_or_text(text: str) -> str:
    """Every <answer> tag's content, joined by spaces and stripped, or else the whole text."""
    return " ".join(ANSWER_TAG.findall(text)).strip() or text


def medevalkit_parse(text: str) -> str:
    """MedEvalKit's parse_response: lower case; where "boxed" occurs the last \\boxed{}
    (without a closed one the string "None", as mathruler returns), else where "<answer>"
    occurs the tags' contents; then whatever follows each label of MEDEVALKIT_LABELS."""
    text = text.lower()
    if "boxed" in text:
        boxed = boxed_content(text)
        text = "None" if boxed is None else boxed
    elif "<answer>" in text:
        text = answer_tags_or_text(text)
    for label in MEDEVALKIT_LABELS:
        if label in text:
            text = text.split(label)[-1]
    return text


def medevalkit_reply(completion: str) -> str:
    """What MedEvalKit's VQA-RAD, PathVQA, SLAKE scoring reads: the last \\boxed{}, else tags."""
    boxed = boxed_content(completion)
    return answer_tags_or_text(completion) if boxed is None else boxed


def medevalkit_choice(completion: str, sample: dict) -> float:
    """MedEvalKit's judge_multi_choice as its OmniMedVQA and MedXpertQA scoring calls it (the
    <answer> tags' contents; options written "A. CT"): the letter the reply opens with, else
    the option most similar to the whole reply by difflib, with no cutoff."""
    letters = [letter.lower() for letter in sample["options"]]
    options = [f"{letter}. {text}".lower() for letter, text in sample["options"].items()]
    reply = answer_tags_or_text(completion).lower()
    # 1) A bare letter as the first paragraph, or before the first full stop of the last one.
    paragraphs = reply.split("\n\n")
    if paragraphs[0] in letters:
        reply = paragraphs[0]
    elif paragraphs[-1].split(".")[0] in letters:
        reply = paragraphs[-1].split(".")[0]
    # 2) The parsed reply up to its first full stop, after its last colon, must be a letter.
    reply = medevalkit_parse(reply).strip().lower().replace("\n", "")
    head = reply.split(".")[0].split(":")[-1]
    if head in letters:
        return float(head == sample["answer"].lower())
    # 3) Else (an empty reply too) the first option most similar to it, in difflib's argument
    # order (option, reply): the ratio is not symmetric on long replies (autojunk).
    similarity = [SequenceMatcher(None, option, reply).ratio() for option in options]
    return float(letters[similarity.index(max(similarity))] == sample["answer"].lower())


def medevalkit_closed(completion: str, sample: dict) -> float:
    """MedEvalKit's closed questions. A yes/no gold (judge_judgement, VQA-RAD's and PathVQA's
    rule): right when exactly one of the substrings "yes" and "no" is in the parsed reply (so
    "not", "normal" and "nodule" say no) and the gold is one of them. Any other gold
    (judge_close_end_vqa, SLAKE's): the parsed reply must be the lower-cased gold exactly."""
    reply = medevalkit_parse(medevalkit_reply(completion)).replace("\n", "").replace(".", "")
    gold = sample["answer"].lower()
    if gold.strip() in ("yes", "no"):
        return float((("yes" in reply) != ("no" in reply)) and gold.strip() in reply)
    return float(reply == gold)


def medevalkit_open(completion: str, sample: dict) -> float:
    """MedEvalKit's count for open questions without its LLM judge (the "em" of
    judge_open_end_vqa): the parsed reply must be the lower-cased gold exactly."""
    reply = medevalkit_parse(medevalkit_reply(completion).lower().strip())
    return float(reply == sample["answer"].lower().strip())


def accuracy_medevalkit(completion: str, sample: dict) -> float:
    """MedEvalKit's rule for the sample's answer type (choice, closed or open)."""
    rule = {"choice": medevalkit_choice, "closed": medevalkit_closed, "open": medevalkit_open}
    return rule[answer_type(sample)](completion, sample)


REWARDS = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "closed_accuracy": closed_accuracy,
    "exact_match": exact_match,
    "token_recall": token_recall,
    "token_f1": token_f1,
    "accuracy_medr1_reward": accuracy_medr1_reward,
    "accuracy_medr1_think": accuracy_medr1_think,
    "accuracy_medr1_raw": accuracy_medr1_raw,
    "accuracy_medevalkit": accuracy_medevalkit,
}


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; a length, so not in REWARDS):
    0 up to max_length - buffer tokens, then linearly down to -factor at max_length and beyond."""
    exceed = length - (max_length - buffer)
    return min(0.0, -factor * min(exceed / buffer, 1.0))


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
