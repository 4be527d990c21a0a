"""MedEvalKit's rules (rewards.accuracy_medevalkit) as tables, each score worked out by hand from
its published utils/utils.py, beside our `accuracy` where the two disagree."""

import pytest
import torch

import eval as evaluation
from rewards import REWARDS, accuracy_medevalkit, accuracy_reward

OPTIONS = {"A": "CT", "B": "MRI", "C": "X-Ray", "D": "Ultrasound"}
# MedEvalKit's OmniMedVQA options as its similarity fallback sees them: "a. ct" (5 characters),
# "b. mri" (6), "c. x-ray" (8), "d. ultrasound" (13); difflib's ratio is 2 M / (both lengths),
# M the characters in the matching blocks it finds.


def choice(gold: str) -> dict:
    return {"options": OPTIONS, "answer": gold, "answer_type": "choice"}


def closed(gold: str) -> dict:
    return {"options": {}, "answer": gold, "answer_type": "closed"}


def open_(gold: str) -> dict:
    return {"options": {}, "answer": gold, "answer_type": "open"}


# completion, sample, MedEvalKit's score, ours (accuracy)
CHOICE_TABLE = [
    ("<answer>B</answer><think>MRI shows it.</think>", choice("B"), 1, 1),
    ("<answer>b</answer>", choice("B"), 1, 1),
    ("<answer>C</answer>", choice("B"), 0, 0),
    # The text before the first full stop of the last paragraph is the letter "b".
    ("<answer>B. MRI</answer>", choice("B"), 1, 1),
    # "answer is" is one of its labels: what follows it, " b", is read.
    ("<answer>The answer is B</answer>", choice("B"), 1, 0),
    ("The answer is B. It shows a T2 signal.", choice("B"), 1, 0),
    # A first paragraph that is a bare letter is the answer.
    ("B\n\nThe T2 signal points to MRI.", choice("B"), 1, 0),
    # A box is read wherever "boxed" occurs.
    ("<answer>\\boxed{B}</answer>", choice("B"), 1, 0),
    # Every tag's content is read, joined: "a b" is no letter, and "a. ct" is the most similar
    # option (M = 2: "a", " "; 4/8 = 0.5 against b's 2/9, c's 2/11, d's 2/16). Ours reads the
    # last tag.
    ("<think>Not <answer>A</answer>.</think><answer>B</answer>", choice("B"), 0, 1),
    # Unparsable replies are mapped to the most similar option. "(b)" shares only "b" with
    # "b. mri" (2/9); no other option shares a character.
    ("<answer>(B)</answer>", choice("B"), 1, 1),
    # "an mri scan" (11): "b. mri" matches " mri", 8/17 = 0.47; "a. ct" matches "a", " ",
    # "c", 6/16 = 0.375; "c. x-ray" 4/19; "d. ultrasound" 8/24. The right option; ours: none.
    ("<answer>an MRI scan</answer>", choice("B"), 1, 0),
    # "sonography" (10) means ultrasound, but "c. x-ray" matches "ra" and "y", 6/18 = 0.33,
    # above "d. ultrasound"'s "ra", 4/23. A wrong option.
    ("<answer>sonography</answer>", choice("D"), 0, 0),
    # "a, b" names two options (ours: ambiguous); "a. ct" matches "a" and " ", 4/9, above
    # "b. mri"'s 2/10.
    ("<answer>A, B</answer>", choice("A"), 1, 0),
    # No cutoff: with every ratio 0 the first option is chosen, so an empty answer, or a
    # letter that is no option's, scores whenever the gold is A.
    ("", choice("A"), 1, 0),
    ("<answer>E</answer>", choice("A"), 1, 0),
    ("<answer>E</answer>", choice("B"), 0, 0),
    # An option's text: "ct" against "a. ct" is 4/7, against "c. x-ray" 2/10.
    ("<answer>CT</answer>", choice("A"), 1, 1),
]

CLOSED_TABLE = [
    ("<answer>Yes</answer>", closed("yes"), 1, 1),
    ("<answer>No.</answer>", closed("no"), 1, 1),
    ("<answer>No</answer>", closed("yes"), 0, 0),
    ("<answer>yes</answer>", closed("Yes"), 1, 1),
    # Both substrings "yes" and "no" occur: wrong, whatever the gold. Ours reads the first word.
    ("<answer>Yes, there is no mass</answer>", closed("yes"), 0, 1),
    ("<answer>yes and no</answer>", closed("yes"), 0, 1),
    # Every tag's content is read, joined: "yes no". Ours reads the last tag.
    ("<answer>yes</answer><answer>no</answer>", closed("no"), 0, 1),
    # Substrings, not words: "nodule", "abnormal" hold "no", "eyes" holds "yes".
    ("<answer>There is a nodule</answer>", closed("no"), 1, 0),
    ("<answer>The findings are abnormal</answer>", closed("no"), 1, 0),
    ("<answer>eyes</answer>", closed("yes"), 1, 0),
    # The text after the label "answer is", and a box, are read.
    ("The answer is yes", closed("yes"), 1, 0),
    ("\\boxed{no}", closed("no"), 1, 0),
    # Any other closed gold (SLAKE's): the parsed reply, full stops removed, must be the gold
    # lower-cased; nothing is stripped, so " left lung" after the label "answer:" is wrong.
    ("<answer>Left lung.</answer>", closed("Left Lung"), 1, 1),
    ("<answer>The left lung</answer>", closed("Left Lung"), 0, 1),
    ("Answer: left lung", closed("Left Lung"), 0, 1),
]

OPEN_TABLE = [
    # Without its LLM judge, an open answer counts when it is the gold lower-cased, exactly:
    # no article or full stop is dropped, and the space after the label "answer:" stays.
    ("<answer>Left Lung</answer>", open_("left lung"), 1, 1),
    ("<answer>left lung.</answer>", open_("left lung"), 0, 1),
    ("<answer>The left lung</answer>", open_("left lung"), 0, 1),
    ("Answer: left lung", open_("left lung"), 0, 1),
    ("<answer>lung</answer>", open_("left lung"), 0, 0),
]


@pytest.mark.parametrize("completion, sample, medevalkit, ours", CHOICE_TABLE)
def test_medevalkit_choice_table(completion, sample, medevalkit, ours):
    assert accuracy_medevalkit(completion, sample) == medevalkit
    assert accuracy_reward(completion, sample) == ours


@pytest.mark.parametrize("completion, sample, medevalkit, ours", CLOSED_TABLE)
def test_medevalkit_closed_table(completion, sample, medevalkit, ours):
    assert accuracy_medevalkit(completion, sample) == medevalkit
    assert accuracy_reward(completion, sample) == ours


@pytest.mark.parametrize("completion, sample, medevalkit, ours", OPEN_TABLE)
def test_medevalkit_open_table(completion, sample, medevalkit, ours):
    assert accuracy_medevalkit(completion, sample) == medevalkit
    assert accuracy_reward(completion, sample) == ours


def test_a_random_pick_scores_chance_under_medevalkit():
    """The random-guess row gives every scorer one chance value: one pick in n scores."""
    for gold in OPTIONS:
        picks = [accuracy_medevalkit(f"<answer>{letter}</answer>", choice(gold))
                 for letter in OPTIONS]
        assert picks == [float(letter == gold) for letter in OPTIONS]
    for gold in ("yes", "no"):
        assert [accuracy_medevalkit(f"<answer>{word}</answer>", closed(gold))
                for word in ("yes", "no")] == [float(gold == "yes"), float(gold == "no")]


def test_evaluation_scores_every_answer_by_medevalkit(tiny, modality_split,
                                                      single_process_group):
    assert REWARDS["accuracy_medevalkit"] is accuracy_medevalkit
    assert "accuracy_medevalkit" in evaluation.SCORERS
    model, processor = tiny
    samples = modality_split[1][:2]
    results = evaluation.evaluate(model, processor, samples, "think-after", torch.device("cpu"),
                                  max_new_tokens=8, image_size=None)
    for result, sample in zip(results, samples):
        assert result["accuracy_medevalkit"] == accuracy_medevalkit(result["completion"], sample)
    summary = evaluation.summarize(results)
    assert summary["accuracy_medevalkit"] == sum(r["accuracy_medevalkit"] for r in results) / 2
