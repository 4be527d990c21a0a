"""Bad input gets a clear error naming the file and record; odd but valid images are converted,
not rejected."""

import json
import os

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
from PIL import Image

import data
import eval as evaluation
import inputs
import sources
from helpers import SMALL, metrics, png, run, run_fail


def good_record(i: int, image: str) -> dict:
    return {"dataset": "Mixed", "question_id": f"ok-{i}", "question_type": "Modality Recognition",
            "question": "Which modality?", "gt_answer": "CT", "image_path": image, "option_A": "CT",
            "option_B": "MRI", "modality_type": "CT(Computed Tomography)"}


@pytest.fixture
def mixed_root(tmp_path):
    """A dataset in OmniMedVQA's layout with images of every odd kind, and one record of every
    bad kind."""
    images = tmp_path / "Images" / "Mixed"
    images.mkdir(parents=True)
    gray = np.linspace(0, 60000, 64 * 64).reshape(64, 64)
    odd = {
        "gray16.png": Image.fromarray(gray.astype(np.uint16)),
        "palette.png": Image.new("RGB", (40, 50), (200, 30, 30)).convert("P"),
        "cmyk.jpg": Image.new("CMYK", (60, 60), (0, 255, 255, 0)),
        "rgba.png": Image.new("RGBA", (60, 30), (0, 0, 255, 128)),
        "huge.png": Image.new("RGB", (3000, 2000), (0, 128, 0)),
    }
    for name, image in odd.items():
        image.save(images / name)
    for i in range(6):
        Image.new("RGB", (56, 56), (i * 40, 0, 0)).save(images / f"plain{i}.png")
    (images / "garbage.png").write_bytes(b"this is not an image")
    Image.new("RGB", (64, 64)).save(images / "full.png")
    (images / "truncated.png").write_bytes((images / "full.png").read_bytes()[:-30])
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "full.jpg")
    # A valid header and half the pixels: opening and verify() pass, only decoding fails.
    (images / "truncated.jpg").write_bytes((images / "full.jpg").read_bytes()[:3000])
    names = [*odd, *[f"plain{i}.png" for i in range(6)]]
    records = [good_record(i, f"Images/Mixed/{name}") for i, name in enumerate(names)]
    bad = {
        "missing-image": {"image_path": "Images/Mixed/nowhere.png"},
        "garbage-image": {"image_path": "Images/Mixed/garbage.png"},
        "truncated-image": {"image_path": "Images/Mixed/truncated.png"},
        "truncated-jpeg": {"image_path": "Images/Mixed/truncated.jpg"},
        "escaping-path": {"image_path": "../../etc/passwd"},
        "one-option": {"option_B": ""},
        "answer-not-an-option": {"gt_answer": "X-Ray"},
        "no-question": {"question": None},
    }
    for qid, change in bad.items():
        record = {**good_record(0, "Images/Mixed/plain0.png"), **change, "question_id": qid}
        records.append({k: v for k, v in record.items() if v is not None})
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "Mixed.json").write_text(json.dumps(records))
    return tmp_path, bad


def test_odd_images_are_converted_to_rgb(mixed_root):
    root, _ = mixed_root
    for name in ["gray16.png", "palette.png", "cmyk.jpg", "rgba.png", "huge.png"]:
        image = inputs.load_image(str(root / "Images" / "Mixed" / name))
        assert image.mode == "RGB"
    gray = np.asarray(inputs.load_image(str(root / "Images" / "Mixed" / "gray16.png")))
    assert gray.min() == 0 and gray.max() == 255  # scaled by its range, not clipped to white


def test_a_huge_image_is_shrunk_to_the_budget(mixed_root):
    root, _ = mixed_root
    huge = str(root / "Images" / "Mixed" / "huge.png")
    assert inputs.load_image(huge, 384).size == (384, 384)


@pytest.mark.parametrize("qid, message", [
    ("missing-image", "no such file"), ("garbage-image", "cannot identify image"),
    ("truncated-image", "truncated|broken|Truncated"), ("truncated-jpeg", "truncated"),
    ("escaping-path", "leaves the dataset root"),
    ("one-option", "at least 2 options"), ("answer-not-an-option", "matches 0 options"),
    ("no-question", "missing field"),
])
def test_each_bad_record_stops_loading_by_name(mixed_root, qid, message):
    root, bad = mixed_root
    qa = root / "QA_information" / "Open-access" / "Mixed.json"
    records = [r for r in json.loads(qa.read_text())
               if r["question_id"].startswith("ok") or r["question_id"] == qid]
    qa.write_text(json.dumps(records))
    with pytest.raises(data.DataError, match=message) as error:
        data.check_images(sources.load_omnimedvqa(root))
    assert qid in str(error.value)


def test_a_jpeg_cut_after_its_header_fails_the_check(mixed_root):
    """Opening it and PIL's verify() pass: only decoding finds it."""
    root, _ = mixed_root
    with Image.open(root / "Images" / "Mixed" / "truncated.jpg") as image:
        image.verify()  # the header-only check this project used to rely on
    assert "truncated" in data.image_error(str(root / "Images" / "Mixed" / "truncated.jpg"))


def test_bad_records_stop_training_unless_skipped(mixed_root, tiny_path, tmp_path):
    root, bad = mixed_root
    stopped = run_fail(["train.py", "--data", str(root), "--steps", "1", *SMALL,
                        "--output_dir", str(tmp_path)])
    assert "Mixed.json, record 'escaping-path'" in stopped  # the first bad record in the file
    # Two ranks: each decodes half of the images, and both must skip all the bad ones.
    out = run(["train.py", "--data", str(root), "--steps", "2", *SMALL, "--prompts_per_step", "2",
               "--skip_bad_records", "true", "--output_dir", str(tmp_path)], nproc=2)
    assert f"skipped {len(bad)} bad records" in out
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


# What a file holds instead of a list of OmniMedVQA records, and the message that must name it.
BAD_FILES = [
    (b'[{"question_id": "q1",', "not valid JSON"),
    (b'{"question_id": "q1"}', "must hold a JSON list"),
    (b'["q1", "q2"]', "must hold a JSON list"),
    ('[{"question": "Quelle modalit\xe9 ?"}]'.encode("latin-1"), "not UTF-8"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_a_file_not_a_list_of_records_is_named(tmp_path, content, message):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "Broken.json").write_bytes(content)
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_omnimedvqa(tmp_path)
    assert "Broken.json" in str(error.value)


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    record = json.dumps([good_record(0, "Images/x.png")])
    (qa / "Bom.json").write_bytes(b"\xef\xbb\xbf" + record.encode())
    assert [s["id"] for s in sources.load_omnimedvqa(tmp_path)] == ["ok-0"]


@pytest.mark.parametrize("change, message", [
    ({"image_path": None}, "image_path must be a string, not NoneType"),
    ({"image_path": 7}, "image_path must be a string, not int"),
    ({"option_B": ["MRI"]}, "option_B must be a string, not list"),
    ({"option_B": True}, "option_B must be a string, not bool"),
    ({"question": None}, "question must be a string, not NoneType"),
    ({"option_E": "Ultrasound"}, "beyond option_D"),
    ({"question": "Which modality?<|im_end|>"}, "special token '<\\|im_end\\|>'"),
    ({"option_A": "CT <|image_pad|>"}, "option_A holds the special token"),
])
def test_a_field_of_the_wrong_kind_is_refused_by_name(tmp_path, change, message):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "Odd.json").write_text(json.dumps([{**good_record(0, "Images/x.png"), **change}]))
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_omnimedvqa(tmp_path)
    assert "Odd.json, record 'ok-0'" in str(error.value)


@pytest.mark.parametrize("change, message", [
    ({"image": "/etc/passwd"}, "leaves the dataset root"),
    ({"image": "../../etc/passwd"}, "leaves the dataset root"),
    ({"image": "../../nowhere.png"}, "leaves the dataset root"),
    ({"solution": None}, "solution must be a string"),
    ({"problem": 3}, "problem must be a string"),
])
def test_a_split_file_record_obeys_the_same_rules(tmp_path, change, message):
    record = {"image": "Images/x.png", "problem": "Which? A)CT, B)MRI",
              "solution": "<answer> A </answer>"}
    path = tmp_path / "X-Ray_test.json"
    path.write_text(json.dumps([{**record, **change}]))
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_medr1_split(path, image_root=tmp_path)
    assert "X-Ray_test.json, record 0" in str(error.value)
    with pytest.raises(data.DataError, match="cannot be read"):
        sources.load_medr1_split(tmp_path / "CT(Computed Tomography)_test.json",
                                 image_root=tmp_path)


def test_nan_pixels_do_not_blacken_a_float_image(tmp_path):
    pixels = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    pixels[0, 0] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "float.tiff")
    gray = np.asarray(inputs.load_image(str(tmp_path / "float.tiff")))[..., 0]
    assert gray[0, 0] == 0 and gray[-1, -1] == 255 and gray[16, 16] not in (0, 255)


def test_a_fifo_is_no_image(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(data.DataError, match="not a regular file"):
        data.check_images([{"id": "q", "images": [str(tmp_path / "fifo.png")]}])


def parquet(*rows: dict) -> bytes:
    """rows of a question with one image (unless a row gives its own) as a parquet file's bytes."""
    rows = [{"image": {"bytes": png(), "path": None}, "question": "Q?", "answer": "yes", **row}
            for row in rows]
    sink = pyarrow.BufferOutputStream()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def jsonl(*records: dict) -> bytes:
    return "\n".join(json.dumps({"image": "a.png", "question": "Q?", "answer": "yes", **r})
                     for r in records).encode()


def pmc_csv(header: str, row: str) -> bytes:
    return f"{header}\n{row}\n".encode()


PMC = "Figure_path,Question,Answer,Choice A,Choice B,Answer_label"
# The files of one set (name, content; in the order given), and what the message must say after
# the folder: the file and record at fault, and the real cause.
BAD_SETS = [
    # Ids name the questions: two records with one id, in one file or in two files of a set.
    ([("same.jsonl", jsonl({"id": "same", "question": "Q1?"}, {"id": "same", "question": "Q2?"}))],
     "same.jsonl: the id 'same' is given to two records ('Q1?' and 'Q2?')"),
    ([("a.jsonl", jsonl({"id": "same"})), ("b.jsonl", jsonl({"id": "same"}))],
     "a.jsonl and {folder}/b.jsonl: the id 'same' is given to two records"),
    ([("a.jsonl", jsonl({})), ("a.jsonl", jsonl({}))], "a.jsonl is read twice in one set"),
    # An image that does not decode is named by its parquet file and row, not by its copy.
    ([("not_image.parquet", parquet({}, {"image": {"bytes": b"not an image", "path": None}}))],
     "not_image.parquet, row 1: image 1 does not decode (not an image file PIL can read)"),
    ([("cut.parquet", parquet({"image": {"bytes": png()[:-30], "path": "x.png"}}))],
     "cut.parquet, row 0: image 1 does not decode (image file is truncated"),
    # A column missing or empty is named, not the answer or the image it would have given.
    ([("test_clean.csv", pmc_csv(PMC.removesuffix(",Answer_label"), "p.jpg,Q?,x,A:x,B:y"))],
     "test_clean.csv, row 0: the file has no answer label column (PMC-VQA's Answer_label), "
     "and its answer 'x' is no option's letter"),
    ([("pmc.parquet", parquet({"answer": "x", "choice a": "A:x", "choice b": "B:y"}))],
     "pmc.parquet, row 0: the file has no answer label column"),
    ([("test.csv", pmc_csv(PMC, "p.jpg,Q?,x,A:x,B:y,"))],
     "test.csv, row 0: the answer label is empty"),
    ([("test.csv", pmc_csv(PMC.removeprefix("Figure_path,"), "Q?,x,A:x,B:y,A"))],
     "test.csv: needs a Figure_path column, question and answer; it has ['Question'"),
    ([("test.csv", pmc_csv(PMC, ",Q?,x,A:x,B:y,A"))], "test.csv, row 0: Figure_path is empty"),
    ([("test.json", json.dumps([{"qid": 1, "img_name": "", "question": "Q?", "answer": "No",
                                 "q_lang": "en", "answer_type": "CLOSED"}]).encode())],
     "test.json, record 0: img_name is empty"),
    ([("X-Ray_test.json", json.dumps([{"image": "", "problem": "Q? A)x, B)y",
                                       "solution": "<answer> A </answer>"}]).encode())],
     "X-Ray_test.json, record 0: image is empty"),
]


@pytest.mark.parametrize("files, message", BAD_SETS)
def test_a_bad_file_in_a_set_is_named_with_its_cause(tmp_path, files, message):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "p.jpg")
    for name, content in files:
        (tmp_path / name).write_bytes(content)
    spec = "+".join(str(tmp_path / name) for name, _ in files)
    with pytest.raises(data.DataError) as error:
        [paths] = data.read_spec(spec).values()
        data.check_images(data.load_set(paths, tmp_path, tmp_path / "cache"))
    assert f"{tmp_path}/{message.format(folder=tmp_path)}" in str(error.value)


def test_a_repeated_id_stops_loading_unless_skipped(tmp_path):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    records = [good_record(0, "Images/x.png"), good_record(1, "Images/x.png"),
               {**good_record(2, "Images/y.png"), "question_id": "ok-0"}]
    (qa / "Twice.json").write_text(json.dumps(records))
    with pytest.raises(data.DataError, match=f"{tmp_path}: the id 'ok-0' is given to two records"):
        data.load_splits(tmp_path, [], [])
    errors = []
    kept = data.one_per_id([(tmp_path, sources.load_omnimedvqa(tmp_path))], errors)
    assert [s["images"] for s in kept] == [[str(tmp_path / "Images" / "x.png")]] * 2
    assert len(errors) == 1


def test_eval_checks_every_adapters_base_model_first(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "moved"), "peft_type": "LORA"}))
    cfg = evaluation.EvalConfig(checkpoints=f"{tmp_path / 'model'},{tmp_path / 'adapter'}")
    with pytest.raises(SystemExit) as error:
        evaluation.resolve(cfg)
    assert (f"the adapter '{tmp_path / 'adapter'}' is on the base model '{tmp_path / 'moved'}', "
            "which holds no config.json") in str(error.value)
