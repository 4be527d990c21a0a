"""The paper's tables from eval.py, on a fixture in the real OmniMedVQA layout."""

import csv
import json

import pytest

import data
import eval as evaluation
import model as modellib
from test_train import run


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    """A few records per modality, options shuffled as in the real data, plus Med-R1 split files for two."""
    root = data.make_synthetic(tmp_path_factory.mktemp("omnimedvqa"), images_per_modality=20, fixed_order=False)
    for modality in ("CT", "OCT"):
        samples = data.load_omnimedvqa(root, modalities=[modality])
        records = [{"image": s["image"].split(str(root) + "/")[1], "problem": data.problem_text(s),
                    "solution": f"<answer> {s['answer']} </answer>"} for s in samples]
        (root / f"{data.MODALITIES[modality]}_test.json").write_text(json.dumps(records))
    return root


def test_train_then_eval_gives_the_cross_modality_matrix(fixture_root, tiny_path, tmp_path):
    checkpoints = []
    for modality in ("CT", "MRI"):
        out = tmp_path / modality
        run(["train.py", "--data", str(fixture_root), "--modalities", modality, "--steps", "2",
             "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "8", "--eval_every", "0",
             "--eval_size", "4", "--output_dir", str(out)])
        checkpoints.append(str(out / "final"))
    run(["eval.py", "--checkpoints", ",".join(checkpoints), "--data", str(fixture_root), "--max_new_tokens", "8",
         "--output", str(tmp_path / "tables")])

    with open(tmp_path / "tables" / "accuracy.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["trained_on", *sorted(data.MODALITIES), "average"]
    assert [row[0] for row in table[1:]] == ["random guess", "CT", "MRI"]
    held_out = data.split_by_image(data.load_omnimedvqa(fixture_root))[1]
    for j, modality in enumerate(sorted(data.MODALITIES), start=1):
        # Chance accuracy by hand: the mean of 1 / (number of options) over the column's questions.
        samples = [s for s in held_out if s["modality"] == modality]
        assert float(table[1][j]) == pytest.approx(100 * sum(1 / len(s["options"]) for s in samples) / len(samples),
                                                   abs=0.006)
    for row, checkpoint in zip(table[2:], checkpoints):
        values = [float(v) for v in row[1:-1]]
        assert float(row[-1]) == pytest.approx(sum(values) / len(values), abs=0.006)
        results = json.loads((tmp_path / checkpoint.split("/")[-2] / "final" / "eval_results.json").read_text())
        assert values == [round(100 * results["per_test_set"][m]["accuracy"], 2) for m in sorted(data.MODALITIES)]
    assert "### accuracy_medr1_strict" in (tmp_path / "tables" / "accuracy.md").read_text()


def test_eval_on_medr1_split_files_makes_one_column_per_file(fixture_root, tiny_path, tmp_path):
    files = [str(fixture_root / f"{data.MODALITIES[m]}_test.json") for m in ("CT", "OCT")]
    run(["eval.py", "--checkpoints", str(tiny_path), "--split_files", ",".join(files), "--data", str(fixture_root),
         "--max_new_tokens", "8", "--output", str(tmp_path)])
    with open(tmp_path / "accuracy.csv") as f:
        header = next(csv.reader(f))
    assert header == ["trained_on", "CT", "OCT", "average"]
    results = json.loads((tiny_path / "eval_results.json").read_text())
    assert results["overall"]["questions"] == sum(len(json.loads(open(f).read())) for f in files)


def test_summary_counts_both_accuracies_and_parse_failures():
    results = [{"correct": True, "strict_correct": False, "choice": "B", "rationale_chars": 10},
               {"correct": False, "strict_correct": False, "choice": None, "rationale_chars": 0},
               {"correct": True, "strict_correct": True, "choice": "A", "rationale_chars": 20},
               {"correct": False, "strict_correct": False, "choice": "C", "rationale_chars": 30}]
    summary = evaluation.summarize(results)
    assert summary == {"accuracy": 0.5, "accuracy_medr1_strict": 0.25, "parse_failures": 0.25,
                       "rationale_chars": 15.0, "questions": 4}


def test_stopping_at_the_closed_answer_keeps_the_answer(tiny, modality_split):
    model, processor = tiny
    prompts = data.collate(modality_split[1][:6], processor, "think-after")
    end_ids = modellib.end_token_ids(model, processor.tokenizer)
    full = modellib.sample(model, prompts, 1, 32, end_ids, [], temperature=0.0)
    short = modellib.sample(model, prompts, 1, 32, end_ids, [], temperature=0.0,
                            stop=evaluation.answer_closed(processor.tokenizer))
    full_texts, short_texts = modellib.decode(processor.tokenizer, full), modellib.decode(processor.tokenizer, short)
    assert short.completion_mask.sum() < full.completion_mask.sum()
    for whole, cut in zip(full_texts, short_texts):
        assert cut.endswith("</answer>") and whole.startswith(cut) and "<think>" in whole


def test_the_synthetic_questions_of_a_real_layout_fixture_load_with_shuffled_options(fixture_root):
    samples = data.load_omnimedvqa(fixture_root, question_types=["Modality Recognition"])
    letters = {s["answer"] for s in samples}
    assert len(letters) > 1  # shuffled: the answer letter is not fixed by the modality
    assert all(len(s["options"]) == 4 for s in samples)
