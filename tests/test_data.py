"""Datasets, prompts and the OmniMedVQA layout."""

import json
from collections import Counter
from pathlib import Path

import pytest

import data
import sources

SHARED = Path(__file__).resolve().parents[2] / "shared" / "medr1-splits"


def write_qa(root: Path, records: list[dict]) -> None:
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    (qa / "Tiny.json").write_text(json.dumps(records))


def record(**changes) -> dict:
    base = {"dataset": "Tiny", "question_id": "q1", "question_type": "Modality Recognition",
            "question": "Which modality?", "gt_answer": "MRI", "image_path": "Images/Tiny/1.png",
            "option_A": "CT", "option_B": "MRI",
            "modality_type": "MR (Mag-netic Resonance Imaging)"}
    return {**base, **changes}


def test_synthetic_dataset_has_the_omnimedvqa_layout(dataset_root):
    files = sorted((dataset_root / "QA_information" / "Open-access").glob("*.json"))
    assert len(files) == 8
    records = [r for f in files for r in json.loads(f.read_text())]
    fields = {"dataset", "question_id", "question_type", "question", "gt_answer", "image_path",
              "option_A", "option_B", "modality_type"}
    assert all(fields <= set(r) for r in records)
    assert all((dataset_root / r["image_path"]).exists() and r["image_path"].startswith("Images/")
               for r in records)
    assert {r["modality_type"] for r in records} == set(sources.MODALITIES.values())
    assert {r["question_type"] for r in records} == set(sources.QUESTION_TYPES)
    n_options = Counter(sum(f"option_{L}" in r for L in sources.LETTERS) for r in records)
    assert set(n_options) == {2, 3, 4}
    # gt_answer is the option text, never a letter.
    assert all(r["gt_answer"] in [r.get(f"option_{L}") for L in sources.LETTERS] for r in records)


def test_loader_gives_the_sample_form(dataset_root):
    samples = sources.load_omnimedvqa(dataset_root, modalities=["OCT"],
                                      question_types=["Lesion Grading"])
    assert samples and all(s["modality"] == "OCT" and s["question_type"] == "Lesion Grading"
                           for s in samples)
    sample = samples[0]
    assert set(sample) == {"id", "images", "question", "options", "answer", "answer_type",
                           "modality", "question_type"}
    assert sample["options"][sample["answer"]] in ("Grade I", "Grade II", "Grade III")
    assert Path(sample["images"][0]).exists() and len(sample["images"]) == 1


def test_the_split_holds_out_whole_images(modality_split):
    train, test = modality_split
    assert not {s["images"][0] for s in train} & {s["images"][0] for s in test}
    assert len(test) >= 256 and len(train) == 4 * len(test)
    assert data.split_by_image(train + test) == (train, test)  # fixed: the same split every time


def test_the_split_keeps_the_letter_balance(modality_split):
    _, test = modality_split
    assert set(Counter(s["answer"] for s in test).values()) == {len(test) // 4}


@pytest.mark.parametrize("changes, message", [
    ({"gt_answer": "X-Ray"}, "matches 0 options"),
    ({"option_B": None}, "at least 2 options"),
    ({"image_path": "../outside.png"}, "leaves the dataset root"),
    ({"question": None}, "missing field"),
])
def test_a_bad_record_is_named_with_its_file(tmp_path, changes, message):
    bad = {k: v for k, v in record(**changes).items() if not (k == "question" and v is None)}
    write_qa(tmp_path, [record(question_id="fine"), {**bad, "question_id": "broken-7"}])
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_omnimedvqa(tmp_path)
    assert "Tiny.json" in str(error.value) and "broken-7" in str(error.value)


def test_empty_selection_is_an_error(tmp_path):
    write_qa(tmp_path, [record()])
    with pytest.raises(data.DataError, match="no samples"):
        sources.load_omnimedvqa(tmp_path, modalities=["CT"])


def test_problem_text_is_written_as_medr1_writes_it():
    sample = {"question": "What is shown?", "options": {"A": "CT", "B": "MRI scan", "C": "X-Ray"}}
    assert data.problem_text(sample) == "What is shown? A)CT, B)MRI scan, C)X-Ray"


@pytest.mark.skipif(not SHARED.exists(),
                    reason="../shared/medr1-splits is not in a user's checkout")
@pytest.mark.parametrize("mode, released", [("think-before", "think-before:"),
                                            ("no-think", "no-think:")])
def test_training_templates_are_medr1s_verbatim(mode, released):
    """PROMPTS.md lists each released template on the line after its name."""
    lines = (SHARED / "PROMPTS.md").read_text().splitlines()
    template = lines[lines.index(released) + 1].strip()
    sample = {"question": "Q?", "options": {"A": "x", "B": "y"}}
    assert data.build_prompt(sample, mode) == template.replace("{Question}", "Q? A)x, B)y")


def test_think_after_asks_for_the_answer_first():
    prompt = data.build_prompt({"question": "Q?", "options": {"A": "x", "B": "y"}}, "think-after")
    assert prompt.startswith("Q? A)x, B)y ") and prompt.index("<answer>") < prompt.index("<think>")
