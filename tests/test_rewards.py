"""Rule rewards as a table: each completion with its expected format score per prompt mode and its accuracy."""

import pytest

from rewards import REWARDS, accuracy_reward, extract_choice, format_reward

OPTIONS = {"A": "CT", "B": "MRI", "C": "X-Ray", "D": "Ultrasound"}
# Gold is "A" so that a parser which wrongly reads the article "a", or the first
# of several letters, would score 1 where the spec says 0.
SAMPLE = {"options": OPTIONS, "answer": "A"}

# completion, format score for (think-after, think-before, no-think), accuracy
TABLE = [
    # Layouts: each mode accepts only its own tag order.
    ("<answer>A</answer><think>CT shows the bleed.</think>", (1, 0, 0), 1),
    ("<answer>A</answer>\n\n<think>\nCT shows\nthe bleed.\n</think>", (1, 0, 0), 1),
    ("<think>CT shows the bleed.</think> <answer>A</answer>", (0, 1, 0), 1),
    ("<think>\nline one\nline two\n</think>\n<answer>\nA\n</answer>", (0, 1, 0), 1),
    ("<answer>A</answer>", (0, 0, 1), 1),
    ("  \n<answer>A</answer>\n  ", (0, 0, 1), 1),
    # Anything outside the tags breaks the format but not the answer.
    ("Sure! <think>easy</think><answer>A</answer>", (0, 0, 0), 1),
    ("<answer>A</answer> Hope this helps.", (0, 0, 0), 1),
    ("<answer>A</answer><think>unfinished", (0, 0, 0), 1),
    ("The answer is A.", (0, 0, 0), 0),
    ("", (0, 0, 0), 0),
    # Accepted ways to write the gold letter.
    ("<answer>A.</answer>", (0, 0, 1), 1),
    ("<answer>(A)</answer>", (0, 0, 1), 1),
    ("<answer>A)</answer>", (0, 0, 1), 1),
    ("<answer>A) CT</answer>", (0, 0, 1), 1),
    ("<answer>a</answer>", (0, 0, 1), 1),
    ("<answer>CT</answer>", (0, 0, 1), 1),
    ("<answer>ct</answer>", (0, 0, 1), 1),
    # Wrappers a model writes around its answer: markdown emphasis, code quotes, an "Answer:" label.
    ("<answer>**A**</answer>", (0, 0, 1), 1),
    ("<answer>`A`</answer>", (0, 0, 1), 1),
    ("<answer>Answer: A</answer>", (0, 0, 1), 1),
    ("<answer>**Answer:** A) CT</answer>", (0, 0, 1), 1),
    ("<answer>Final answer: *ct*</answer>", (0, 0, 1), 1),
    ("**Answer: A**", (0, 0, 0), 1),
    # Wrong, ambiguous or invalid answers.
    ("<answer>B</answer>", (0, 0, 1), 0),
    ("<answer>MRI</answer>", (0, 0, 1), 0),
    ("<answer>A, B</answer>", (0, 0, 1), 0),
    ("<answer>A and B</answer>", (0, 0, 1), 0),
    ("<answer>A or B</answer>", (0, 0, 1), 0),
    ("<answer></answer>", (0, 0, 1), 0),
    ("<answer>E</answer>", (0, 0, 1), 0),
    ("<answer>I</answer>", (0, 0, 1), 0),
    ("<answer>a lesion in the lung</answer>", (0, 0, 1), 0),
    ("<answer>**A** or **B**</answer>", (0, 0, 1), 0),
    ("<answer>Answer: A and B</answer>", (0, 0, 1), 0),
    ("<answer>Answer: B</answer>", (0, 0, 1), 0),
    ("<answer>The answer is A</answer>", (0, 0, 1), 0),
    # The last <answer> tag counts, even one written inside <think>.
    ("<think>Maybe <answer>B</answer>? No.</think><answer>A</answer>", (0, 1, 0), 1),
    ("<answer>A</answer><think>Or rather <answer>B</answer></think>", (1, 0, 0), 0),
]
MODES = ("think-after", "think-before", "no-think")


@pytest.mark.parametrize("completion, formats, accuracy", TABLE)
def test_reward_table(completion, formats, accuracy):
    for mode, expected_format in zip(MODES, formats):
        sample = {**SAMPLE, "mode": mode}
        assert format_reward(completion, sample) == expected_format, mode
        assert accuracy_reward(completion, sample) == accuracy, mode


@pytest.mark.parametrize(
    "text, letter",
    [
        ("<answer>B</answer>", "B"),
        ("<answer>(c)</answer>", "C"),
        ("<answer>b) MRI</answer>", "B"),
        ("<answer>ultrasound</answer>", "D"),
        ("<answer> D. </answer>", "D"),
        ("B", "B"),  # no tag: the whole completion, read by the same rules
        ("I would say B", None),
        ("<answer>A and B</answer>", None),
        ("<answer>E</answer>", None),
        ("<answer>a lesion in the lung</answer>", None),
        ("<answer>  </answer>", None),
    ],
)
def test_extract_choice_returns_the_upper_case_letter_or_none(text, letter):
    assert extract_choice(text, OPTIONS) == letter


def test_rewards_registry_maps_names_to_functions_of_completion_and_sample():
    sample = {**SAMPLE, "mode": "no-think"}
    assert REWARDS["format"]("<answer>B</answer>", sample) == 1.0
    assert REWARDS["format"]("<think>x</think><answer>B</answer>", sample) == 0.0
    assert REWARDS["accuracy"]("<answer>A</answer>", sample) == 1.0
    assert REWARDS["accuracy"]("<answer>B</answer>", sample) == 0.0
