"""Readers of our JSONL records and of the benchmarks' files, on fixtures laid out as they ship."""

import json
import sys
from pathlib import Path

import pyarrow  # an optional extra; the README's test command installs it
import pyarrow.parquet
import pytest
from PIL import Image

import data
import eval as evaluation
import sources
from helpers import metrics, png, run, run_fail


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """rows as a parquet file, image cells as the datasets library stores them ({bytes, path})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_jsonl_records_of_every_answer_type_load(tmp_path):
    for name, size in [("a.png", (40, 30)), ("b.png", (20, 60)), ("c.png", (33, 33))]:
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "img" / name)
    records = [
        {"id": "q1", "image": "img/a.png", "question": "Which modality?", "options": ["CT", "MRI"],
         "answer": "B", "modality": "MRI"},
        {"images": ["img/a.png", "img/b.png", "img/c.png"], "question": "Is the lesion larger?",
         "answer": "Yes"},
        {"images": ["img/b.png", "img/c.png"], "question": "Which organ?", "answer": "left lung",
         "answer_type": "open", "question_type": "Anatomy"},
        {"image": str(tmp_path / "img" / "c.png"), "question": "Which is bigger?",
         "answer": "liver", "answer_type": "closed", "options": {}},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    samples = data.load_file(path, None, tmp_path / "cache")
    image = str((tmp_path / "img").resolve()) + "/"
    assert samples == [
        {"id": "q1", "images": [image + "a.png"], "question": "Which modality?",
         "options": {"A": "CT", "B": "MRI"}, "answer": "B", "answer_type": "choice",
         "modality": "MRI", "question_type": ""},
        {"id": "mine.jsonl#2", "images": [image + "a.png", image + "b.png", image + "c.png"],
         "question": "Is the lesion larger?", "options": {}, "answer": "Yes",
         "answer_type": "closed", "modality": "", "question_type": ""},
        {"id": "mine.jsonl#3", "images": [image + "b.png", image + "c.png"],
         "question": "Which organ?", "options": {}, "answer": "left lung", "answer_type": "open",
         "modality": "", "question_type": "Anatomy"},
        {"id": "mine.jsonl#4", "images": [image + "c.png"], "question": "Which is bigger?",
         "options": {}, "answer": "liver", "answer_type": "closed", "modality": "",
         "question_type": ""},
    ]
    assert data.check_images(samples) == samples


GOOD = {"image": "a.png", "question": "Q?", "answer": "A", "options": ["x", "y"]}


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    ("[1, 2]", "line 1: must be a JSON object, not list"),
    (json.dumps({"image": "a.png", "answer": "yes"}), r"missing \['question'\]"),
    (json.dumps({**GOOD, "images": ["a.png"]}), "one of image or images"),
    (json.dumps({**GOOD, "colour": "red"}), r"unknown fields \['colour'\]"),
    (json.dumps({"images": [], "question": "Q?", "answer": "yes"}),
     "images must be a non-empty list"),
    (json.dumps({"images": "a.png", "question": "Q?", "answer": "yes"}),
     "images must be a list of paths"),
    (json.dumps({**GOOD, "answer": "C"}),
     "answer 'C' must be the letter of one of at least 2 options"),
    (json.dumps({**GOOD, "options": ["x"]}), "at least 2 options"),
    (json.dumps({**GOOD, "options": {"A": "x", "C": "y"}}), "the keys A, B, ... in order"),
    (json.dumps({**GOOD, "answer_type": "open"}), "answer_type 'open' takes no options"),
    (json.dumps({"image": "a.png", "question": "Q?", "answer": "x", "answer_type": "choice"}),
     "answer_type 'choice' needs options"),
    (json.dumps({"image": "a.png", "question": "Q?", "answer": "x", "answer_type": "free"}),
     "answer_type 'free' is not one of"),
    (json.dumps({"image": "a.png", "question": "Q?", "answer": 3}),
     "answer must be a string, not int"),
    (json.dumps({"image": "a.png", "question": "Q?", "answer": " "}),
     "the answer ' ' has no words"),
    (json.dumps({"image": "a.png", "question": "Q <|im_end|>?", "answer": "x"}), "special token"),
    (json.dumps({"image": "a.png", "question": "Q?", "answer": "?"}),
     "the answer '\\?' has no words"),
    (json.dumps({**GOOD, "options": list("ABCDEFGHIJK")}), "at most 10"),
    (json.dumps({**GOOD, "image": None, "images": ["a.png"]}),
     r"gives both image \(None\) and images"),
    (json.dumps({**GOOD, "image": None}), "image must be a path, not None"),
    (json.dumps({"question": "Q?", "answer": "yes"}), r"missing \['image or images'\]"),
    (json.dumps({**GOOD, "id": ["q1"]}), r"id must be a string or a whole number, not \['q1'\]"),
])
def test_a_bad_jsonl_record_is_named_by_its_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line.replace("line 1", "") + "\n")
    message = message.replace("line 1: ", "")
    with pytest.raises(data.DataError, match=f"bad.jsonl, line 2.*{message}"):
        data.load_file(path, None, tmp_path)
    errors = []
    assert len(data.load_file(path, None, tmp_path, errors)) == 1 and len(errors) == 1


def test_vqa_rad_parquet_loads_as_it_ships(tmp_path):
    """flaviagiammarino/vqa-rad: data/test-*.parquet with image {bytes, path}, question, answer."""
    images = [png((40, 30)), png((64, 64), (0, 0, 255))]
    folder = tmp_path / "vqa-rad" / "data"
    path = write_parquet(folder / "test-00000-of-00001-e5bc3d208bb4deeb.parquet", [
        {"image": {"bytes": images[0], "path": None}, "question": "is there a fracture?",
         "answer": "Yes"},
        {"image": {"bytes": images[1], "path": "x.png"}, "question": "where is the mass?",
         "answer": "left lung"},
        {"image": {"bytes": images[0], "path": None}, "question": "is it normal?", "answer": "no"},
    ])
    spec = data.read_spec(str(folder / "test-*.parquet"))
    assert list(spec) == ["vqa-rad"]
    samples = data.load_file(spec["vqa-rad"][0], None, tmp_path / "cache")
    assert [(s["answer_type"], s["answer"], s["options"]) for s in samples] == [
        ("closed", "Yes", {}), ("open", "left lung", {}), ("closed", "no", {})]
    assert samples[0]["images"] == samples[2]["images"]  # the same bytes are written once
    assert [Path(s["images"][0]).read_bytes() for s in samples] == [images[0], images[1], images[0]]
    assert samples[1]["id"] == path.name + "#1"
    # Named by their content on any machine, whatever the cache folder or data root.
    name = Path(samples[1]["images"][0]).name
    assert data.image_names(samples[1], tmp_path / "elsewhere") == [name]
    assert evaluation.random_guess_accuracy([samples[0], samples[2]]) == 0.5
    # An open question has no chance accuracy.
    assert evaluation.random_guess_accuracy(samples) is None


def test_an_image_cell_of_raw_bytes_is_read(tmp_path):
    """pandas-written files, and some on the hub, hold the image's bytes, not {bytes, path}."""
    image = png()
    path = write_parquet(tmp_path / "raw_bytes.parquet",
                         [{"image": image, "question": "Q?", "answer": "yes"}])
    [sample] = data.load_file(path, None, tmp_path / "cache")
    assert [Path(p).read_bytes() for p in sample["images"]] == [image]


def test_pmc_vqa_parquet_choices_lose_their_labels(tmp_path):
    """PMC-VQA's parquet mirror: choice a-d written "A:text", the gold in answer label."""
    path = write_parquet(tmp_path / "pmc.parquet", [
        {"image": {"bytes": png(), "path": "PMC1.jpg"}, "question": "What is shown?",
         "answer": "Liver", "choice a": "A:Spleen", "choice b": " B: Liver", "choice c": "C:Kidney",
         "choice d": "D:Heart",
         "answer label": "B"}])
    [sample] = data.load_file(path, None, tmp_path / "cache")
    assert sample["options"] == {"A": "Spleen", "B": "Liver", "C": "Kidney", "D": "Heart"}
    assert (sample["answer"], sample["answer_type"]) == ("B", "choice")
    assert sample["images"][0].endswith(".jpg")


def test_pmc_vqa_csv_loads_as_its_authors_ship_it(tmp_path):
    """train.csv / test_clean.csv beside images/ (images.zip), choices written "A:text"."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "images" / "PMC1_F2.jpg")
    (tmp_path / "test_clean.csv").write_text(
        "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        'PMC1_F2.jpg,"What does the arrow show, in red?",Cyst, A:Tumour, B:Cyst, C:Abscess, '
        "D:Normal,B\n"
        "PMC1_F2.jpg,Which stain?,H&E,A:H&E,B:PAS,,,E\n")
    errors = []
    [sample] = data.load_file(tmp_path / "test_clean.csv", None, tmp_path, errors)
    assert sample == {"id": "test_clean.csv#0",
                      "images": [str(tmp_path / "images" / "PMC1_F2.jpg")],
                      "question": "What does the arrow show, in red?",
                      "options": {"A": "Tumour", "B": "Cyst", "C": "Abscess", "D": "Normal"},
                      "answer": "B", "answer_type": "choice", "modality": "", "question_type": ""}
    assert errors == [f"{tmp_path / 'test_clean.csv'}, row 1: answer 'E' must be the letter of "
                      "one of at least 2 options ['A', 'B']"]
    assert data.default_name(tmp_path / "test_clean.csv") == tmp_path.name


def test_bad_benchmark_rows_are_named(tmp_path):
    """A choice left empty would shift the letters after it (and the gold with them): refused."""
    image = {"bytes": png(), "path": None}
    rows = [{"image": image, "question": "Q?", "answer": "x", "choice a": "A:x", "choice b": None,
             "choice c": "C:y", "answer label": "C", "q_lang": "en", "qid": 0},
            {"image": image, "question": "Q?", "answer": "x", "choice a": "A:x", "choice b": "B:y",
             "choice c": None, "answer label": "B", "q_lang": "en", "qid": 1},
            {"image": image, "question": None, "answer": "x", "choice a": "A:x", "choice b": "B:y",
             "choice c": None, "answer label": "A", "q_lang": "en", "qid": 2},
            {"image": image, "question": "问题?", "answer": "x", "choice a": "A:x",
             "choice b": "B:y", "choice c": None, "answer label": "A", "q_lang": "zh", "qid": 3}]
    path = write_parquet(tmp_path / "t.parquet", rows)
    message = "t.parquet, row 0: options must be .* the keys A, B, ... in order"
    with pytest.raises(data.DataError, match=message):
        data.load_file(path, None, tmp_path)
    errors = []
    [sample] = data.load_file(path, None, tmp_path, errors)  # row 3 is not English: left out
    assert (sample["id"], sample["options"], sample["answer"]) == ("1", {"A": "x", "B": "y"}, "B")
    assert [e.split(": ")[0] for e in errors] == [f"{path}, row 0", f"{path}, row 2"]
    assert "question must be a string, not NoneType" in errors[1]


def test_mmmu_questions_keep_their_images_in_order(tmp_path):
    """MMMU/MMMU: one folder per subject, image_1..image_7 (None when unused), options as text."""
    first, second, third = (png((30, 30), (1, 1, 1)), png((50, 20), (2, 2, 2)),
                            png((20, 50), (3, 3, 3)))
    empty = {f"image_{n}": None for n in range(1, 8)}
    folder = tmp_path / "MMMU" / "Clinical_Medicine"
    path = write_parquet(folder / "validation-00000-of-00001.parquet", [
        {"id": "validation_Clinical_Medicine_1", "question": "<image 1> <image 2> Which lesion?",
         "options": "['Cyst', 'Abscess', 'Tumour']", **empty,
         "image_1": {"bytes": first, "path": None}, "image_2": {"bytes": second, "path": None},
         "answer": "C", "question_type": "multiple-choice", "subfield": "Pathology"},
        {"id": "validation_Clinical_Medicine_2", "question": "<image 1> How many?",
         "options": "[]", **empty,
         "image_1": {"bytes": third, "path": None}, "image_3": {"bytes": first, "path": None},
         "answer": "3", "question_type": "open", "subfield": "Heart"},
    ])
    assert data.default_name(path) == "Clinical_Medicine"
    choice, open_ = data.load_file(path, None, tmp_path / "cache")
    assert choice["options"] == {"A": "Cyst", "B": "Abscess", "C": "Tumour"}
    assert ((choice["answer"], choice["answer_type"], choice["question_type"])
            == ("C", "choice", "Pathology"))
    assert [Path(p).read_bytes() for p in choice["images"]] == [first, second]
    assert (open_["answer"], open_["answer_type"], open_["options"]) == ("3", "open", {})
    assert [Path(p).read_bytes() for p in open_["images"]] == [third, first]


def test_slake_keeps_its_english_questions(tmp_path):
    (tmp_path / "imgs" / "xmlab0").mkdir(parents=True)
    Image.new("RGB", (30, 30)).save(tmp_path / "imgs" / "xmlab0" / "source.jpg")
    record = {"img_id": 0, "img_name": "xmlab0/source.jpg", "location": "Lung", "modality": "CT",
              "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"]}
    (tmp_path / "test.json").write_text(json.dumps([
        {**record, "qid": 1, "question": "Is the lung healthy?", "answer": "No", "q_lang": "en",
         "answer_type": "CLOSED"},
        {**record, "qid": 2, "question": "肺健康吗?", "answer": "否", "q_lang": "zh",
         "answer_type": "CLOSED"},
        {**record, "qid": 3, "question": "Which is bigger, liver or spleen?", "answer": "Liver",
         "q_lang": "en", "answer_type": "CLOSED"},
        {**record, "qid": 4, "question": "Where is the abnormality?", "answer": "Left Lung, Right",
         "q_lang": "en", "answer_type": "OPEN"}]))
    samples = data.load_file(tmp_path / "test.json", None, tmp_path / "cache")
    message = "only Med-R1's split files are tested on the rest of --data"
    with pytest.raises(data.DataError, match=message):
        data.load_splits(tmp_path, [], [], train_split=str(tmp_path / "test.json"))
    assert [(s["id"], s["answer_type"], s["answer"]) for s in samples] == [
        ("1", "closed", "No"), ("3", "closed", "Liver"), ("4", "open", "Left Lung, Right")]
    assert samples[0]["images"] == [str(tmp_path / "imgs" / "xmlab0" / "source.jpg")]
    assert samples[0]["modality"] == "CT"
    assert data.default_name(tmp_path / "test.json") == tmp_path.name
    (tmp_path / "CT_test.json").write_text(json.dumps([
        {"image": "a.png", "problem": "Q? A)x, B)y", "solution": "<answer> A </answer>"}]))
    message = "CT_test.json: not SLAKE's .*, nor by its name a Med-R1 split file"
    with pytest.raises(data.DataError, match=message):
        data.load_file(tmp_path / "CT_test.json", tmp_path, tmp_path)


def test_the_spec_syntax_gives_each_set_its_files(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "c-1.jsonl", "c-2.jsonl"):
        (tmp_path / name).write_text("")
    spec = data.read_spec(f"{tmp_path}/a.jsonl,both={tmp_path}/a.jsonl+{tmp_path}/b.jsonl,"
                          f"c={tmp_path}/c-*.jsonl")
    assert spec == {"a": [tmp_path / "a.jsonl"],
                    "both": [tmp_path / "a.jsonl", tmp_path / "b.jsonl"],
                    "c": [tmp_path / "c-1.jsonl", tmp_path / "c-2.jsonl"]}
    with pytest.raises(data.DataError, match="no file matches"):
        data.read_spec(f"{tmp_path}/d-*.jsonl")
    with pytest.raises(data.DataError, match="a second set named 'a'"):
        data.read_spec(f"{tmp_path}/a.jsonl,a={tmp_path}/b.jsonl")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(data.DataError, match="not a file this project reads"):
        data.load_file(tmp_path / "x.txt", None, tmp_path)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "t.parquet", [{"image": {"bytes": png(), "path": None},
                                                   "question": "Q?", "answer": "yes"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    message = r"t.parquet: reading parquet needs pyarrow \(pip install pyarrow\)"
    with pytest.raises(data.DataError, match=message):
        data.load_file(path, None, tmp_path)


def test_parquet_missing_a_column_is_named(tmp_path):
    path = write_parquet(tmp_path / "t.parquet",
                         [{"picture": b"x", "question": "Q?", "answer": "yes"}])
    with pytest.raises(data.DataError, match="t.parquet: needs an image column"):
        data.load_file(path, None, tmp_path)
    path = write_parquet(tmp_path / "u.parquet", [{"image": {"bytes": None, "path": "x.png"},
                                                   "question": "Q?", "answer": "yes"}])
    message = "u.parquet, row 0: an image cell holds no image bytes"
    with pytest.raises(data.DataError, match=message):
        data.load_file(path, None, tmp_path)


def benchmark_files(root: Path, dataset_root) -> dict:
    """From the synthetic images: our JSONL (choice, closed and open, one to three images per
    question) to train and to test on, and a VQA-RAD-shaped parquet test file; no image on two
    sides."""
    samples = sources.load_omnimedvqa(dataset_root, question_types=["Modality Recognition"])
    images = sorted({s["images"][0] for s in samples})

    def records(images):
        rows = []
        for i, s in enumerate(s for s in samples if s["images"][0] in images):
            if i % 3 == 0:
                rows.append({"images": [s["images"][0]], "question": s["question"],
                             "options": s["options"], "answer": s["answer"],
                             "modality": s["modality"]})
            elif i % 3 == 1:
                rows.append({"images": [s["images"][0], images[(i + 1) % len(images)]],
                             "question": "Is the first image a CT?",
                             "answer": "yes" if s["modality"] == "CT" else "no"})
            else:
                rows.append({"images": [s["images"][0]] + images[:2],
                             "question": "Which modality is it?", "answer": s["modality"]})
        return rows

    files = {"train": root / "train.jsonl", "test": root / "test.jsonl"}
    for side, chosen in [("train", images[:60]), ("test", images[60:80])]:
        files[side].write_text("\n".join(json.dumps(r) for r in records(chosen)))
    rad = [{"image": {"bytes": Path(image).read_bytes(), "path": None}, "question": "is this a ct?",
            "answer": "yes" if "CT" in image else "no"} for image in images[80:86]]
    rad += [{"image": {"bytes": Path(image).read_bytes(), "path": None},
             "question": "what modality?", "answer": "x-ray"} for image in images[86:90]]
    files["rad"] = write_parquet(root / "vqa-rad" / "data" / "test-00000-of-00001.parquet", rad)
    return files


def test_two_ranks_give_one_ranks_sft_loss(tmp_path, tiny_path, dataset_root):
    """Each rank's targets hold a different number of tokens: the loss is the mean over all."""
    files = benchmark_files(tmp_path, dataset_root)
    # --model: with its own cache folder the run would build the tiny model again.
    args = ["train.py", "--model", str(tiny_path), "--algo", "sft",
            "--train_split", str(files["train"]), "--test_split", str(files["test"]),
            "--steps", "1", "--prompts_per_step", "4", "--eval_size", "2", "--eval_every", "0",
            "--cache_dir", str(tmp_path / "cache")]
    for nproc in (1, 2):
        run([*args, "--output_dir", str(tmp_path / f"ranks{nproc}")], nproc)
    [one], [two] = metrics(tmp_path / "ranks1"), metrics(tmp_path / "ranks2")
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)


def test_the_scripts_read_benchmark_files_end_to_end(tmp_path, tiny_path, dataset_root):
    """Our JSONL with several images and free answers to train and test on, and a VQA-RAD
    parquet file to test on."""
    files = benchmark_files(tmp_path, dataset_root)
    out = tmp_path / "run"
    # --model: with its own cache folder the run would build the tiny model again.
    printed = run(["train.py", "--model", str(tiny_path), "--train_split", str(files["train"]),
                   "--test_split", str(files["test"]), "--steps", "2", "--prompts_per_step", "2",
                   "--num_generations", "2", "--max_new_tokens", "8", "--eval_size", "6",
                   "--rewards", "format,accuracy,token_f1", "--output_dir", str(out),
                   "--cache_dir", str(tmp_path / "cache")])
    assert "training and 6 held-out questions" in printed
    assert all(k in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
               for k in ("reward_accuracy", "reward_token_f1"))
    tables = tmp_path / "tables"
    printed = run(["eval.py", "--checkpoints", str(out / "final"), "--max_new_tokens", "8",
                   "--output", str(tables),
                   "--split_files", f"mine={files['test']},{tmp_path}/vqa-rad/data/test-*.parquet",
                   "--cache_dir", str(tmp_path / "cache")])
    results = json.loads((tables / "eval_results.json").read_text())
    [row] = results.values()
    assert list(row["per_test_set"]) == ["mine", "vqa-rad"]
    rad = row["per_test_set"]["vqa-rad"]
    assert (rad["questions"], rad["closed_questions"], rad["open_questions"]) == (10, 6, 4)
    assert row["per_test_set"]["mine"]["seen_images"] == 0.0
    markdown = (tables / "accuracy.md").read_text()
    for key in ("closed_accuracy", "open_exact_match", "open_token_recall", "open_token_f1"):
        assert f"### {key}" in markdown and f"\n{key} (%)" in printed
    # Chance is defined for closed questions (one in two) but not for open ones.
    closed = markdown.split("### closed_accuracy")[1]
    assert "| random guess | 50.00 | 50.00 | 50.00 | 50.00 |" in closed
    assert "| random guess | n/a | n/a | n/a | n/a |" in markdown.split("### open_token_f1")[1]


def test_a_missing_image_in_a_jsonl_file_stops_training(tmp_path, tiny_path, dataset_root):
    """Before any step, naming its record."""
    files = benchmark_files(tmp_path, dataset_root)
    lines = files["train"].read_text().splitlines()
    record = json.loads(lines[1])
    record["images"][1] = str(tmp_path / "gone.png")
    files["train"].write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]))
    failed = run_fail(["train.py", "--train_split", str(files["train"]),
                       "--test_split", str(files["test"]), "--output_dir", str(tmp_path / "other")])
    assert f"record 'train.jsonl#2': image {tmp_path / 'gone.png'}: no such file" in failed
