"""The paper's tables from eval.py, on a fixture in the real OmniMedVQA layout."""

import csv
import json
import math
import shutil

import pytest
import torch

import data
import eval as evaluation
import model as modellib
import sources
import tiny
from helpers import run, run_fail, write_medr1_split


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    """A few records per modality, options shuffled as in the real data, plus Med-R1 split files
    for two."""
    root = tiny.make_synthetic(tmp_path_factory.mktemp("omnimedvqa"), images_per_modality=20,
                               fixed_order=False)
    for modality in ("CT", "OCT"):
        samples = sources.load_omnimedvqa(root, modalities=[modality])
        write_medr1_split(root / f"{sources.MODALITIES[modality]}_test.json", samples, root)
    return root


def test_train_then_eval_gives_the_cross_modality_matrix(fixture_root, tiny_path, tmp_path):
    checkpoints = []
    for modality in ("CT", "MRI"):
        out = tmp_path / modality
        run(["train.py", "--data", str(fixture_root), "--modalities", modality, "--steps", "2",
             "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "8",
             "--eval_every", "0", "--eval_size", "4", "--output_dir", str(out)])
        checkpoints.append(str(out / "final"))
    run(["eval.py", "--checkpoints", ",".join(checkpoints), "--data", str(fixture_root),
         "--max_new_tokens", "8", "--output", str(tmp_path / "tables")])

    with open(tmp_path / "tables" / "accuracy.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["trained_on", *sorted(sources.MODALITIES), "average", "pooled"]
    assert [row[0] for row in table[1:]] == ["random guess", "CT", "MRI"]
    held_out = data.split_by_image(sources.load_omnimedvqa(fixture_root))[1]

    def chance(samples):
        """By hand: the mean of 1 / (number of options) over the questions, in percent."""
        return 100 * sum(1 / len(s["options"]) for s in samples) / len(samples)

    for j, modality in enumerate(sorted(sources.MODALITIES), start=1):
        column = [s for s in held_out if s["modality"] == modality]
        assert float(table[1][j]) == pytest.approx(chance(column), abs=0.006)
    # The chance row's pooled figure is over every question, not the mean of the columns.
    assert float(table[1][-1]) == pytest.approx(chance(held_out), abs=0.006)
    for row, checkpoint in zip(table[2:], checkpoints):
        values = [float(v) for v in row[1:-2]]
        assert float(row[-2]) == pytest.approx(sum(values) / len(values), abs=0.006)
        results = json.loads((tmp_path / "tables" / "eval_results.json").read_text())[row[0]]
        assert results["checkpoint"] == checkpoint
        accuracies = results["per_test_set"]
        assert values == [round(100 * accuracies[m]["accuracy"], 2)
                          for m in sorted(sources.MODALITIES)]
        # Trained on one modality, tested on the root's held-out side of all: no test image was
        # seen.
        assert results["overall"]["seen_images"] == results["overall"]["trained_questions"] == 0
    markdown = (tmp_path / "tables" / "accuracy.md").read_text()
    assert all(f"### {key}" in markdown
               for key in [*evaluation.SCORERS, "seen_images", "trained_questions"])

    # Med-R1's CT test file holds every CT question of the root: the CT checkpoint trained on
    # the root's training side, so evaluation counts the questions it saw, and warns.
    ct_file = str(fixture_root / f"{sources.MODALITIES['CT']}_test.json")
    out = run(["eval.py", "--checkpoints", checkpoints[0], "--split_files", ct_file,
               "--data", str(fixture_root), "--max_new_tokens", "8",
               "--output", str(tmp_path / "ct-file")])
    ct_samples = sources.load_omnimedvqa(fixture_root, modalities=["CT"])
    training = {data.question_key(s) for s in data.split_by_image(ct_samples)[0]}
    test = sources.load_medr1_split(ct_file, image_root=fixture_root)
    overall = json.loads((tmp_path / "ct-file" / "eval_results.json").read_text())["CT"]["overall"]
    seen = sum(data.question_key(s) in training for s in test) / len(test)
    assert overall["trained_questions"] == pytest.approx(seen)
    assert overall["trained_questions"] > 0.5
    assert "warning" in out and "not a held-out accuracy" in out


def test_each_medr1_split_file_is_one_column(fixture_root, tiny_path, tmp_path):
    files = [str(fixture_root / f"{sources.MODALITIES[m]}_test.json") for m in ("CT", "OCT")]
    run(["eval.py", "--checkpoints", str(tiny_path), "--split_files", ",".join(files),
         "--data", str(fixture_root), "--max_new_tokens", "8", "--output", str(tmp_path)])
    with open(tmp_path / "accuracy.csv") as f:
        header = next(csv.reader(f))
    assert header == ["trained_on", "CT", "OCT", "average", "pooled"]
    results = json.loads((tmp_path / "eval_results.json").read_text())["tiny-qwen2-vl"]
    assert results["overall"]["questions"] == sum(len(json.loads(open(f).read())) for f in files)
    # The base model does not say what it was trained on.
    assert "seen_images" not in results["overall"]


def test_eval_never_writes_into_a_model_folder(tiny_path, tmp_path):
    model = tmp_path / "shared-model"
    shutil.copytree(tiny_path, model)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir())
    run(["eval.py", "--checkpoints", str(model), "--max_samples", "2",
         "--output", str(tmp_path / "out")])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir()) == before
    assert (tmp_path / "out" / "eval_results.json").exists()


def test_eval_says_when_it_cannot_write_its_output(tiny_path, tmp_path):
    model = tmp_path / "shared-model"
    shutil.copytree(tiny_path, model)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir())
    (tmp_path / "a-file").write_text("not a folder")
    printed = run_fail(["eval.py", "--checkpoints", str(model), "--max_samples", "2",
                        "--output", str(tmp_path / "a-file")])
    assert "| shared-model |" in printed  # the tables came first
    assert f"cannot write to --output {tmp_path / 'a-file'}" in printed
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir()) == before


def test_summary_averages_every_scorer():
    scorers = ["accuracy", "accuracy_medr1_think", "accuracy_medr1_raw", "accuracy_medr1_reward",
               "accuracy_medevalkit"]
    # Never averaged: no closed or open question.
    choice = {"answer_type": "choice", "closed_accuracy": 9.0, "exact_match": 9.0,
              "token_recall": 9.0, "token_f1": 9.0}
    results = [{**dict(zip(scorers, [1.0, 0.0, 0.0, 0.0, 1.0])), **choice, "answer": "B",
                "rationale_chars": 10},
               {**dict(zip(scorers, [0.0, 0.0, 1.0, 0.0, 1.0])), **choice, "answer": None,
                "rationale_chars": 0},
               {**dict(zip(scorers, [1.0, 1.0, 0.0, 1.0, 1.0])), **choice, "answer": "A",
                "rationale_chars": 20},
               {**dict(zip(scorers, [0.0, 0.0, 0.0, 0.0, 0.0])), **choice, "answer": "C",
                "rationale_chars": 30}]
    summary = evaluation.summarize(results)
    # parse_failures: the share of answers that could not be read (None).
    assert summary == {"accuracy": 0.5, "accuracy_medr1_think": 0.25, "accuracy_medr1_raw": 0.25,
                       "accuracy_medr1_reward": 0.25, "accuracy_medevalkit": 0.75,
                       "parse_failures": 0.25, "rationale_chars": 15.0, "questions": 4,
                       "closed_questions": 0, "open_questions": 0, "closed_accuracy": None,
                       "open_exact_match": None, "open_token_recall": None,
                       "open_token_f1": None}


def test_summary_scores_closed_and_open_questions_apart():
    def result(kind, accuracy, closed, exact, recall, f1):
        return {"answer_type": kind, "accuracy": accuracy, "accuracy_medr1_think": 0.0,
                "accuracy_medr1_raw": 0.0, "accuracy_medr1_reward": 0.0,
                "accuracy_medevalkit": 0.0, "closed_accuracy": closed, "exact_match": exact,
                "token_recall": recall, "token_f1": f1, "answer": "x", "rationale_chars": 0}
    results = [result("choice", 1.0, 1.0, 1.0, 1.0, 1.0), result("closed", 1.0, 1.0, 0.0, 0.0, 0.0),
               result("closed", 0.0, 0.0, 0.0, 0.0, 0.0), result("closed", 1.0, 1.0, 1.0, 1.0, 1.0),
               result("open", 0.0, 0.0, 0.0, 0.5, 0.6), result("open", 1.0, 1.0, 1.0, 1.0, 1.0)]
    summary = evaluation.summarize(results)
    assert summary["accuracy"] == 4 / 6
    assert (summary["closed_questions"], summary["open_questions"]) == (3, 2)
    assert summary["closed_accuracy"] == 2 / 3
    assert ((summary["open_exact_match"], summary["open_token_recall"], summary["open_token_f1"])
            == (0.5, 0.75, 0.8))


# Per-test-set results of a chance row and a model: "omni" holds no closed question, and "vqa"
# open ones, on which chance is not defined.
ROWS = {"random guess": {"vqa": {"accuracy": None, "closed_accuracy": 0.5},
                         "omni": {"accuracy": 0.25, "closed_accuracy": None},
                         "pooled": {"accuracy": None, "closed_accuracy": 0.5}},
        "model": {"vqa": {"accuracy": 0.6, "closed_accuracy": 0.8},
                  "omni": {"accuracy": 0.4, "closed_accuracy": None},
                  "pooled": {"accuracy": 0.45, "closed_accuracy": 0.8}}}


def test_the_average_is_over_test_sets_with_the_kind():
    accuracy = evaluation.matrix(ROWS, ["vqa", "omni"], "accuracy")
    closed = evaluation.matrix(ROWS, ["vqa", "omni"], "closed_accuracy")
    assert accuracy["model"] == pytest.approx([60.0, 40.0, 50.0, 45.0])
    assert closed["model"][0] == 80.0 and math.isnan(closed["model"][1])
    assert closed["random guess"][2] == 50.0 and closed["model"][2] == 80.0  # over vqa only
    table = evaluation.matrix_markdown(ROWS, ["vqa", "omni"], "closed_accuracy")
    assert "| model | 80.00 | n/a | 80.00 | 80.00 |" in table


def test_chance_is_given_only_where_it_is_defined():
    accuracy = evaluation.matrix(ROWS, ["vqa", "omni"], "accuracy")
    assert str(accuracy["random guess"]) == "[nan, 25.0, nan, nan]"  # chance of open answers: none


def test_evaluation_reads_the_last_answer_tag(tiny, modality_split, single_process_group):
    """think-before: a model taught to write a wrong letter in a tag inside <think>, then the
    gold letter.

    Evaluation decodes to the end and reads the last tag, as the training reward
    does; stopping at the first </answer> would have scored the wrong letter.
    """
    model, processor = tiny
    samples = modality_split[1][:4]
    wrong = {s["id"]: next(letter for letter in s["options"] if letter != s["answer"])
             for s in samples}
    targets = [f"<think>Not <answer>{wrong[s['id']]}</answer>.</think>"
               f"<answer>{s['answer']}</answer>" for s in samples]
    prompts = data.collate(samples, processor, "think-before")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        nll, count = modellib.sft_nll(model, processor.tokenizer, prompts, targets)
        loss = nll / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    results = evaluation.evaluate(model, processor, samples, "think-before", torch.device("cpu"),
                                  max_new_tokens=40, image_size=None)
    assert [r["completion"] for r in results] == targets
    for result, sample in zip(results, samples):
        assert result["answer"] == sample["answer"] and result["accuracy"] == 1.0
        # Med-R1's rule reads the first tag, as released.
        assert result["accuracy_medr1_think"] == 0.0


def test_the_fixtures_options_are_shuffled(fixture_root):
    samples = sources.load_omnimedvqa(fixture_root, question_types=["Modality Recognition"])
    letters = {s["answer"] for s in samples}
    assert len(letters) > 1  # shuffled: the answer letter is not fixed by the modality
    assert all(len(s["options"]) == 4 for s in samples)


def test_two_split_files_for_one_column_are_refused(fixture_root, tmp_path):
    test_file = fixture_root / f"{sources.MODALITIES['CT']}_test.json"
    other = tmp_path / f"{sources.MODALITIES['CT']}_train.json"
    shutil.copy(test_file, other)
    cfg = evaluation.EvalConfig(split_files=f"{test_file},{other}", data=str(fixture_root))
    with pytest.raises(data.DataError, match="a second set named 'CT'"):
        evaluation.test_sets(cfg, str(fixture_root))
