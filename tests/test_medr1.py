"""Med-R1's released split files and rules: the loader, the random-guess baseline, its reward
and evaluation rules."""

import json
import re
from pathlib import Path

import pytest

import data
import eval as evaluation
import sources
from rewards import (REWARDS, accuracy_medr1_raw, accuracy_medr1_reward, accuracy_medr1_think,
                     accuracy_reward, extract_choice, medr1_reward_choice)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "medr1-splits"
needs_splits = pytest.mark.skipif(not SHARED.exists(),
                                  reason="../shared/medr1-splits is not in a user's checkout")

# Each test file, the modality it holds and its record count (the figures in the splits' README).
SPLIT_FILES = {
    "CT(Computed Tomography)_test.json": ("CT", 3241),
    "MR (Mag-netic Resonance Imaging)_test.json": ("MRI", 6370),
    "X-Ray_test.json": ("X-Ray", 1615),
    "ultrasound_test.json": ("Ultrasound", 2074),
    "Dermoscopy_test.json": ("Dermoscopy", 1306),
    "Fundus Photography_test.json": ("Fundus Photography", 1098),
    "OCT (Optical Coherence Tomography_test.json": ("OCT", 848),
    "Microscopy Images_test.json": ("Microscopy", 1110),
}
# Read independently of the loader: the solution field is "<answer> X </answer>".
SOLUTION = re.compile(r"<answer> ([A-D]) </answer>")


@pytest.fixture(scope="module")
def splits():
    """file name -> (raw records, samples) for every released test split."""
    folder = SHARED / "modality-test"
    return {path.name: (json.loads(path.read_text()), sources.load_medr1_split(path))
            for path in sorted(folder.glob("*.json"))}


@needs_splits
def test_each_split_matches_its_readme_line(splits):
    readme = (SHARED / "README.md").read_text().replace("\n", " ")
    assert set(splits) == set(SPLIT_FILES)
    for name, (records, samples) in splits.items():
        modality, count = SPLIT_FILES[name]
        assert f"{modality} {count:,}" in readme
        assert len(samples) == len(records) == count
        assert {s["modality"] for s in samples} == {modality}
        assert {s["question_type"] for s in samples} == {""}
    assert sum(len(samples) for _, samples in splits.values()) == 17662


@needs_splits
def test_split_samples_take_the_solution_letter(splits):
    for name, (records, samples) in splits.items():
        for index, (record, sample) in enumerate(zip(records, samples)):
            assert set(sample) == {"id", "images", "question", "options", "answer", "answer_type",
                                   "modality", "question_type"}
            assert sample["id"] == f"{Path(name).stem}#{index}"
            assert sample["images"] == [record["image"]]
            assert sample["answer"] == SOLUTION.fullmatch(record["solution"]).group(1)
            assert list(sample["options"]) == list("ABCD"[:len(sample["options"])])


@needs_splits
def test_problem_text_rebuilds_every_released_problem(splits):
    for records, samples in splits.values():
        assert [data.problem_text(s) for s in samples] == [r["problem"] for r in records]


@needs_splits
def test_random_guessing_scores_26_98_percent_pooled(splits):
    pooled = [s for _, samples in splits.values() for s in samples]
    assert round(100 * evaluation.random_guess_accuracy(pooled), 2) == 26.98


def test_random_guess_is_one_over_the_option_count():
    samples = [{"options": {"A": "x", "B": "y"}},
               {"options": {"A": "w", "B": "x", "C": "y", "D": "z"}}]
    assert evaluation.random_guess_accuracy(samples) == (1 / 2 + 1 / 4) / 2


# problem, and by hand: its question, option texts and gold option text. The first three are
# real problems; option texts hold brackets and commas, the third question holds a double space
# and "(IQA)".
PROBLEMS = [
    ("What imaging technique is employed for obtaining this image? A)Mammogram, "
     "B)Positron emission tomography (PET), C)CT, D)Fluoroscopy",
     "What imaging technique is employed for obtaining this image?",
     ["Mammogram", "Positron emission tomography (PET)", "CT", "Fluoroscopy"], "CT"),
    ("Which imaging technique was employed to obtain this image? A)Ultrasound, "
     "B)Near-infrared Spectroscopy (NIRS), C)Diffuse Optical Imaging (DOI), "
     "D)Magnetoencephalography (MEG)",
     "Which imaging technique was employed to obtain this image?",
     ["Ultrasound", "Near-infrared Spectroscopy (NIRS)", "Diffuse Optical Imaging (DOI)",
      "Magnetoencephalography (MEG)"], "Ultrasound"),
    ("Retinal image quality assessment (IQA) is a crucial process. if we used a three-class "
     "grading system that consists of good, bad, and outlier classes.  What specific image "
     "quality of this image? A)It's a good retinal image., B)It's a outlier retinal image., "
     "C)it's a bad retinal image.",
     "Retinal image quality assessment (IQA) is a crucial process. if we used a three-class "
     "grading system that consists of good, bad, and outlier classes.  What specific image "
     "quality of this image?",
     ["It's a good retinal image.", "It's a outlier retinal image.", "it's a bad retinal image."],
     "it's a bad retinal image."),
    ("Where is the lesion, if any? A)Left lobe, upper part (apex), B)None",
     "Where is the lesion, if any?", ["Left lobe, upper part (apex)", "None"],
     "Left lobe, upper part (apex)"),
]


@pytest.mark.parametrize("problem, question, texts, gold", PROBLEMS)
def test_a_medr1_problem_round_trips_through_a_record(tmp_path, problem, question, texts, gold):
    raw = {"dataset": "Tiny", "question_id": "q1", "question_type": "Modality Recognition",
           "question": question, "gt_answer": gold, "image_path": "Images/Tiny/1.png",
           "modality_type": "CT(Computed Tomography)"}
    raw.update({f"option_{letter}": text for letter, text in zip("ABCD", texts)})
    sample = sources.record_to_sample(raw, "Tiny.json", tmp_path)
    assert data.problem_text(sample) == problem
    assert sources.parse_problem(problem, "here") == (question, dict(zip("ABCD", texts)))


@pytest.mark.parametrize("problem", ["Is this a type A) case? A)Yes, B)No",
                                     "Which? A)u, B)v, C)w, D)x, E)y"])
def test_options_that_cannot_be_told_apart_are_refused(problem):
    with pytest.raises(sources.DataError, match="here: cannot tell the options apart"):
        sources.parse_problem(problem, "here")


def write_split(folder: Path, name: str, records: list[dict]) -> Path:
    path = folder / name
    path.write_text(json.dumps(records))
    return path


GOOD = {"image": "Images/Tiny/1.png", "problem": "Which modality? A)CT, B)MRI (T1)",
        "solution": "<answer> B </answer>"}


def test_a_split_files_name_gives_type_or_modality(tmp_path):
    path = write_split(tmp_path, "Modality Recognition_train.json", [GOOD])
    [sample] = sources.load_medr1_split(path, image_root=tmp_path / "omni")
    assert sample == {"id": "Modality Recognition_train#0",
                      "images": [str(tmp_path / "omni" / "Images/Tiny/1.png")],
                      "answer_type": "choice", "question": "Which modality?",
                      "options": {"A": "CT", "B": "MRI (T1)"}, "answer": "B", "modality": "",
                      "question_type": "Modality Recognition"}
    [sample] = sources.load_medr1_split(write_split(tmp_path, "X-Ray_test.json", [GOOD]))
    assert (sample["modality"], sample["question_type"]) == ("X-Ray", "")


def test_image_root_prefixes_a_split_files_images(tmp_path):
    path = write_split(tmp_path, "X-Ray_test.json", [GOOD])
    [sample] = sources.load_medr1_split(path)
    assert sample["images"] == ["Images/Tiny/1.png"]
    [sample] = sources.load_medr1_split(path, image_root=tmp_path / "omni")
    assert sample["images"] == [str(tmp_path / "omni" / "Images/Tiny/1.png")]


@pytest.mark.parametrize("changes, message", [
    ({"problem": "Which modality? CT or MRI"}, "no ' A\\)'"),
    ({"problem": "Which modality? A)CT or MRI"}, "at least 2 options"),
    ({"solution": "<answer> C </answer>"}, "names none of the options"),
    ({"solution": "B"}, "names none of the options"),
    ({"solution": None}, "missing field"),
])
def test_a_malformed_record_is_named_by_file_and_index(tmp_path, changes, message):
    bad = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    path = write_split(tmp_path, "CT(Computed Tomography)_test.json", [GOOD, bad])
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_medr1_split(path)
    assert "CT(Computed Tomography)_test.json, record 1" in str(error.value)


def test_a_split_file_must_name_a_modality_or_type(tmp_path):
    with pytest.raises(data.DataError, match="all_test.json"):
        sources.load_medr1_split(write_split(tmp_path, "all_test.json", [GOOD]))


# Gold is C. completion, the choice of Med-R1's training reward, our robust choice
# (rewards.extract_choice).
OPTIONS = {"A": "CT", "B": "MRI", "C": "X-Ray", "D": "Ultrasound"}
REWARD_TABLE = [
    ("<answer> C </answer>", "C", "C"),
    ("<think>Bones are bright.</think><answer>C</answer>", "C", "C"),
    ("<answer>D</answer>", "D", "D"),
    # Only the exact letter counts in Med-R1's rule.
    ("<answer>C.</answer>", "C.", "C"),
    ("<answer>(C)</answer>", "(C)", "C"),
    ("<answer>c</answer>", "c", "C"),
    ("<answer>C) X-Ray</answer>", "C) X-Ray", "C"),
    ("<answer>X-Ray</answer>", "X-Ray", "C"),
    # No tag: the whole stripped completion is compared (ours reads it by the same rules as a
    # tag's content).
    ("C", "C", "C"),
    ("  C\n", "C", "C"),
    ("The answer is C", "The answer is C", None),
    ("", "", None),
    # The first tag counts for Med-R1, the last for us.
    ("<answer>C</answer><answer>A</answer>", "C", "A"),
    ("<think>Maybe <answer>A</answer>.</think><answer>C</answer>", "A", "C"),
    # A tag spanning a newline does not match, so a later one-line tag or the whole completion
    # is used.
    ("<answer>\nC\n</answer>", "<answer>\nC\n</answer>", "C"),
    ("<answer>\nA\n</answer><answer>C</answer>", "C", "C"),
]


@pytest.mark.parametrize("completion, medr1, robust", REWARD_TABLE)
def test_medr1_reward_is_the_released_string_match(completion, medr1, robust):
    sample = {"options": OPTIONS, "answer": "C"}
    assert medr1_reward_choice(completion) == medr1
    assert accuracy_medr1_reward(completion, sample) == float(medr1 == "C")
    assert extract_choice(completion, OPTIONS) == robust
    assert accuracy_reward(completion, sample) == float(robust == "C")


def test_medr1_training_reward_is_registered_by_name():
    assert REWARDS["accuracy_medr1_reward"] is accuracy_medr1_reward


# Gold is C. completion, then by hand from Med-R1's released src/eval_vqa scripts: the think
# rule (the first match of <answer>\s*(\w+)\s*</answer>, compared with ==; no match is wrong)
# and the no-think / zero-shot rule (the decoded output itself, unstripped, compared with ==).
EVAL_TABLE = [
    ("<answer>C</answer>", 1, 0),
    ("<answer> C </answer>", 1, 0),
    ("<answer>\nC\n</answer>", 1, 0),  # \s matches newlines
    ("<think>Bones are bright.</think><answer>C</answer>", 1, 0),
    ("C", 0, 1),
    (" C", 0, 0),
    ("C\n", 0, 0),
    ("C.", 0, 0),
    ("<answer>C.</answer>", 0, 0),
    ("<answer>c</answer>", 0, 0),
    ("<answer>(C)</answer>", 0, 0),
    ("<answer>C) X-Ray</answer>", 0, 0),
    ("<answer>X-Ray</answer>", 0, 0),
    ("<answer>CT</answer>", 0, 0),
    ("<answer>A</answer><answer>C</answer>", 0, 0),
    # The first tag that holds one word counts, so a malformed first tag passes the turn.
    ("<answer>C.</answer> <answer>C</answer>", 1, 0),
    ("<think>Maybe <answer>A</answer>.</think><answer>C</answer>", 0, 0),
    ("<answer>C</answer", 0, 0),
    ("<ANSWER>C</ANSWER>", 0, 0),
    ("The answer is C", 0, 0),
    ("", 0, 0),
]


@pytest.mark.parametrize("completion, think, raw", EVAL_TABLE)
def test_medr1_eval_rules_are_the_released_scripts(completion, think, raw):
    sample = {"options": OPTIONS, "answer": "C"}
    assert accuracy_medr1_think(completion, sample) == think
    assert accuracy_medr1_raw(completion, sample) == raw
