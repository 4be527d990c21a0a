"""Rule rewards and prompts as tables: each completion with its expected score, by hand."""

import pytest

from rewards import (
    MODES,
    REWARDS,
    accuracy_reward,
    answer_text,
    closed_accuracy,
    exact_match,
    extract_choice,
    is_yes_no,
    format_reward,
    normalize_answer,
    score,
    token_f1,
    token_recall,
    yes_no,
)

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
LAYOUT_MODES = ("think-after", "think-before", "no-think")


@pytest.mark.parametrize("completion, formats, accuracy", TABLE)
def test_reward_table(completion, formats, accuracy):
    for mode, expected_format in zip(LAYOUT_MODES, formats):
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
def test_extract_choice_gives_a_capital_letter_or_none(text, letter):
    assert extract_choice(text, OPTIONS) == letter


@pytest.mark.parametrize(
    "text, letter",
    [
        ("<answer>C)Hepatitis C</answer>", "C"),  # as the prompt lists options: no space
        ("(b)Hepatitis B", "B"),
        ("<answer>D) Hepatitis A or B</answer>", "D"),  # the option's own text names letters
        ("<answer>d) hepatitis a or b</answer>", "D"),
        ("<answer>A) Hepatitis C</answer>", None),  # a label and another option's text
        ("<answer>C.Hepatitis C</answer>", None),  # no space after "." or ":": prose, not a label
    ],
)
def test_a_label_with_its_own_text_is_that_option(text, letter):
    options = {"A": "Hepatitis A", "B": "Hepatitis B", "C": "Hepatitis C",
               "D": "Hepatitis A or B"}
    assert extract_choice(text, options) == letter


def test_a_question_without_options_has_no_choice():
    assert extract_choice("<answer>A</answer>", {}) is None


def test_rewards_are_registered_by_name():
    sample = {**SAMPLE, "mode": "no-think"}
    assert REWARDS["format"]("<answer>B</answer>", sample) == 1.0
    assert REWARDS["format"]("<think>x</think><answer>B</answer>", sample) == 0.0
    assert REWARDS["accuracy"]("<answer>A</answer>", sample) == 1.0
    assert REWARDS["accuracy"]("<answer>B</answer>", sample) == 0.0


# ---------------------------------------------------------------- prompts per answer type

# The think-after template before answer types existed, kept here to pin the choice wording.
OLD_THINK_AFTER = (
    "{problem} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside "
    "<answer>...</answer> tags. 2. Then explain your reasoning briefly, enclosed in "
    "<think>...</think> tags. 3. No extra information or text outside of these tags.")


def test_choice_prompt_keeps_its_old_template():
    problem = "Q? A)x, B)y"
    assert MODES["think-after"].text(problem, "choice") == OLD_THINK_AFTER.format(problem=problem)


def test_free_text_prompt_names_no_letters():
    """Closed and open questions share one prompt, other than the choice one."""
    for name, mode in MODES.items():
        closed, open_ = mode.text("Q?", "closed"), mode.text("Q?", "open")
        assert closed == open_, name
        assert "A, B, C, D" not in closed and "yes" not in closed.lower(), name
        assert closed != mode.text("Q?", "choice"), name
    assert MODES["think-before"].text("Q?", "open") == (
        "Q? Your task: 1. Think through the question step by step, enclose your reasoning "
        "process in <think>...</think> tags. 2. Then provide the answer as a single word or "
        "short phrase inside <answer>...</answer> tags. 3. No extra information or text outside "
        "of these tags.")
    assert MODES["zero-shot"].text("Q?", "closed") == (
        "Q? Provide the answer as a single word or short phrase.")


def test_prompt_text_keeps_braces_in_the_question():
    assert MODES["no-think"].text("Is {x} seen?", "open").startswith("Is {x} seen? Your task:")


def test_warm_up_example_formats_letter_and_reason():
    example = MODES["think-after"].example.format(letter="B", reason="r")
    assert example == "<answer>B</answer><think>r</think>"


# ---------------------------------------------------------------- free-text answers


def closed(gold: str) -> dict:
    return {"options": {}, "answer": gold, "answer_type": "closed"}


def open_(gold: str) -> dict:
    return {"options": {}, "answer": gold, "answer_type": "open"}


@pytest.mark.parametrize(
    "completion, text",
    [
        ("<answer> left lung </answer>", "left lung"),
        ("<answer>**Answer:** left lung</answer>", "left lung"),
        ("<answer>`T2`</answer>", "T2"),  # case is kept: normalize_answer is a separate step
        ("<think>x</think><answer>a</answer><answer>b</answer>", "b"),
        ("Final answer: yes", "yes"),  # no tag: the whole completion
        ("<answer></answer>", ""),
    ],
)
def test_answer_text_is_the_last_tags_bare_text(completion, text):
    assert answer_text(completion) == text


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Left Lung.", "left lung"),
        ("  T2-weighted   MRI ", "t2 weighted mri"),  # punctuation becomes a space
        ("An X-ray", "x ray"),
        ("Crohn's disease", "crohn s disease"),
        ("theory of a thing", "theory of thing"),  # articles only as whole words
        ("Yes!", "yes"),
        ("a", "a"),  # nothing but articles: they stay
        ("the a", "the a"),
        ("", ""),
    ],
)
def test_normalize_answer_drops_case_punctuation_articles(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    "text, answer",
    [
        ("yes", "yes"),
        ("No.", "no"),
        ("**NO**", "no"),
        ("Yes, there is a mass", "yes"),
        ("No, yes", "no"),
        ("yesterday", None),
        ("nodule", None),
        ("There is no mass", None),
        ("not seen", None),
        ("", None),
    ],
)
def test_yes_no_reads_only_a_leading_yes_or_no_word(text, answer):
    assert yes_no(text) == answer


@pytest.mark.parametrize("text, expected", [
    ("Yes.", True), ("no", True), (" NO ", True),
    ("No, it is not", False), ("yesterday", False), ("", False),
])
def test_a_gold_is_yes_no_only_as_the_word_alone(text, expected):
    assert is_yes_no(text) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        # Yes/no golds: the answer's first word decides.
        ("<answer>Yes</answer>", "yes", 1),
        ("<answer>Yes, there is a mass.</answer>", "yes", 1),
        ("<think>yes?</think><answer>No.</answer>", "no", 1),
        ("no", "No", 1),
        ("<answer>no</answer>", "yes", 0),
        ("<answer>yesterday</answer>", "yes", 0),
        ("<answer>There is no mass</answer>", "no", 0),
        ("<answer></answer>", "no", 0),
        # Other closed golds (SLAKE: "Which is bigger, liver or spleen?"): normalised exact match.
        ("<answer>Liver</answer>", "liver", 1),
        ("<answer>the liver</answer>", "Liver", 1),
        ("<answer>liver, not spleen</answer>", "liver", 0),
        ("<answer>spleen</answer>", "liver", 0),
        ("<answer>yes</answer>", "liver", 0),
    ],
)
def test_closed_accuracy_table(completion, gold, expected):
    assert closed_accuracy(completion, closed(gold)) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("<answer>Left lung</answer>", "left lung", 1),
        ("<answer>**The left lung.**</answer>", "left lung", 1),
        ("<answer>Answer: left lung</answer>", "left lung", 1),
        ("<answer>T2-weighted MRI</answer>", "t2 weighted mri", 1),
        ("left lung", "left lung", 1),
        ("<answer>lung</answer>", "left lung", 0),
        ("<answer>left lung, upper lobe</answer>", "left lung", 0),
        ("<answer>left lung</answer><answer>right lung</answer>", "left lung", 0),
        ("<answer></answer>", "left lung", 0),
        ("<answer>Yes, there is</answer>", "yes", 0),  # stricter than closed_accuracy
    ],
)
def test_exact_match_table(completion, gold, expected):
    assert exact_match(completion, open_(gold)) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("<answer>the lung</answer>", "left lung", 0.5),
        ("<answer>left lung</answer>", "left lung", 1.0),
        ("<answer>mass in the left lung</answer>", "left lung", 1.0),  # extra words cost nothing
        ("<answer>lung, left</answer>", "left lung", 1.0),  # order does not matter
        ("<answer>t2 mri</answer>", "t2 weighted mri", 2 / 3),
        ("<answer>lung</answer>", "lung lung left", 0.5),  # gold words counted once
        ("<answer>heart</answer>", "left lung", 0.0),
        ("<answer></answer>", "left lung", 0.0),
        ("<answer>the</answer>", "a", 0.0),  # a gold of articles only keeps them
        ("<answer>A</answer>", "a", 1.0),
        ("<answer></answer>", "a", 0.0),
    ],
)
def test_token_recall_table(completion, gold, expected):
    assert token_recall(completion, open_(gold)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        # precision 1, recall 1/2: 2 * 1 * 0.5 / 1.5
        ("<answer>the lung</answer>", "left lung", 2 / 3),
        ("<answer>left lung</answer>", "left lung", 1.0),
        # precision 2/4, recall 1: 2 * 0.5 * 1 / 1.5
        ("<answer>mass in the left lung</answer>", "left lung", 2 / 3),
        # precision 1, recall 2/3: 2 * (2/3) / (5/3)
        ("<answer>t2 mri</answer>", "t2 weighted mri", 0.8),
        # a multiset: the second "lung" finds no partner, precision 1/2, recall 1
        ("<answer>lung lung</answer>", "lung", 2 / 3),
        ("<answer>heart</answer>", "left lung", 0.0),
        ("<answer></answer>", "left lung", 0.0),
        ("<answer>left lung</answer>", "the", 0.0),
        ("<answer>the</answer>", "an", 0.0),
        ("<answer>an</answer>", "An", 1.0),
    ],
)
def test_token_f1_table(completion, gold, expected):
    assert token_f1(completion, open_(gold)) == pytest.approx(expected)


@pytest.mark.parametrize("metric", [closed_accuracy, exact_match, token_recall, token_f1])
@pytest.mark.parametrize("sample", [SAMPLE, {**SAMPLE, "answer_type": "choice"}])
def test_text_metrics_score_choices_by_letter(metric, sample):
    assert metric("<answer>CT</answer>", sample) == 1.0
    assert metric("<answer>A) CT</answer>", sample) == 1.0
    assert metric("<answer>B</answer>", sample) == 0.0


@pytest.mark.parametrize(
    "completion, sample, expected",
    [
        # choice: the letter rule, so the option's text counts though it is not the gold string
        ("<answer>CT</answer>", SAMPLE, 1),
        ("<answer>A</answer>", {**SAMPLE, "answer_type": "choice"}, 1),
        ("<answer>B</answer>", {**SAMPLE, "answer_type": "choice"}, 0),
        # closed: yes/no from the first word, which exact_match would score 0
        ("<answer>Yes, there is a mass</answer>", closed("yes"), 1),
        ("<answer>yes</answer>", closed("no"), 0),
        # open: whole-answer match, no partial credit
        ("<answer>The left lung</answer>", open_("left lung"), 1),
        ("<answer>lung</answer>", open_("left lung"), 0),
    ],
)
def test_accuracy_reward_dispatches_on_answer_type(completion, sample, expected):
    assert accuracy_reward(completion, sample) == expected


def test_every_reward_scores_open_questions():
    sample = {**open_("left lung"), "id": "q1"}
    [row] = score(["<answer>left lung</answer>"], [sample], list(REWARDS), "no-think")
    expected = {
        "format": 1, "accuracy": 1, "closed_accuracy": 1, "exact_match": 1, "token_recall": 1,
        "token_f1": 1,
        # Med-R1's scorers compare the gold text as a string: the training reward matches,
        # its think evaluation wants one word in the tag, its raw evaluation the bare text.
        "accuracy_medr1_reward": 1, "accuracy_medr1_think": 0, "accuracy_medr1_raw": 0,
        # MedEvalKit's reads the tag's content and, without its LLM judge, wants the gold.
        "accuracy_medevalkit": 1,
    }
    assert dict(zip(REWARDS, row)) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [("<answer>yes</answer>", 1), ("<answer>Yes</answer>", 0), ("<answer>yes.</answer>", 0)],
)
def test_medr1_reward_wants_a_closed_gold_exactly(completion, expected):
    assert REWARDS["accuracy_medr1_reward"](completion, closed("yes")) == expected
