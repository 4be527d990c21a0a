"""Bad input gets a clear error naming the file and record; odd but valid images are converted, not rejected."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import inputs
import sources
from conftest import REPO
from test_train import SMALL, metrics, run


def good_record(i: int, image: str) -> dict:
    return {"dataset": "Mixed", "question_id": f"ok-{i}", "question_type": "Modality Recognition",
            "question": "Which modality?", "gt_answer": "CT", "image_path": image, "option_A": "CT",
            "option_B": "MRI", "modality_type": "CT(Computed Tomography)"}


@pytest.fixture
def mixed_root(tmp_path):
    """A dataset in OmniMedVQA's layout with images of every odd kind, and one record of every bad kind."""
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
    records = [good_record(i, f"Images/Mixed/{name}") for i, name in enumerate([*odd, *[f"plain{i}.png"
                                                                                         for i in range(6)]])]
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


def test_odd_images_are_converted_to_rgb_and_huge_ones_fit_the_budget(mixed_root):
    root, _ = mixed_root
    for name in ["gray16.png", "palette.png", "cmyk.jpg", "rgba.png", "huge.png"]:
        image = inputs.load_image(str(root / "Images" / "Mixed" / name))
        assert image.mode == "RGB"
    gray = np.asarray(inputs.load_image(str(root / "Images" / "Mixed" / "gray16.png")))
    assert gray.min() == 0 and gray.max() == 255  # scaled by its range, not clipped to white
    assert inputs.load_image(str(root / "Images" / "Mixed" / "huge.png"), 384).size == (384, 384)


@pytest.mark.parametrize("qid, message", [
    ("missing-image", "no such file"), ("garbage-image", "cannot identify image"),
    ("truncated-image", "truncated|broken|Truncated"), ("truncated-jpeg", "truncated"), ("escaping-path", "leaves the dataset root"),
    ("one-option", "at least 2 options"), ("answer-not-an-option", "matches 0 options"),
    ("no-question", "missing field"),
])
def test_each_bad_record_stops_loading_with_a_message_naming_it(mixed_root, qid, message):
    root, bad = mixed_root
    qa = root / "QA_information" / "Open-access" / "Mixed.json"
    records = [r for r in json.loads(qa.read_text()) if r["question_id"].startswith("ok") or r["question_id"] == qid]
    qa.write_text(json.dumps(records))
    with pytest.raises(data.DataError, match=message) as error:
        data.check_images(sources.load_omnimedvqa(root))
    assert qid in str(error.value)


def test_a_jpeg_cut_after_its_header_passes_verify_but_not_the_check(mixed_root):
    root, _ = mixed_root
    with Image.open(root / "Images" / "Mixed" / "truncated.jpg") as image:
        image.verify()  # the header-only check this project used to rely on
    assert "truncated" in data.image_error(str(root / "Images" / "Mixed" / "truncated.jpg"))


def test_skip_bad_records_trains_on_the_rest_and_counts_them(mixed_root, tiny_path, tmp_path):
    root, bad = mixed_root
    stopped = run_fail(["train.py", "--data", str(root), "--steps", "1", *SMALL, "--output_dir", str(tmp_path)])
    assert "Mixed.json, record 'escaping-path'" in stopped  # the first bad record in the file
    # Two ranks: each decodes half of the images, and both must skip all the bad ones.
    out = run(["train.py", "--data", str(root), "--steps", "2", *SMALL, "--prompts_per_step", "2",
               "--skip_bad_records", "true", "--output_dir", str(tmp_path)], nproc=2)
    assert f"skipped {len(bad)} bad records" in out
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def run_fail(args: list[str]) -> str:
    """Run a script that must fail; return what it printed."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    return done.stdout + done.stderr


# What a file holds instead of a list of OmniMedVQA records, and the message that must name it.
BAD_FILES = [
    (b'[{"question_id": "q1",', "not valid JSON"),
    (b'{"question_id": "q1"}', "must hold a JSON list"),
    (b'["q1", "q2"]', "must hold a JSON list"),
    ('[{"question": "Quelle modalit\xe9 ?"}]'.encode("latin-1"), "not UTF-8"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_a_file_that_is_not_a_list_of_records_is_named(tmp_path, content, message):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "Broken.json").write_bytes(content)
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_omnimedvqa(tmp_path)
    assert "Broken.json" in str(error.value)


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    qa = tmp_path / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "Bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([good_record(0, "Images/x.png")]).encode())
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
    record = {"image": "Images/x.png", "problem": "Which? A)CT, B)MRI", "solution": "<answer> A </answer>"}
    path = tmp_path / "X-Ray_test.json"
    path.write_text(json.dumps([{**record, **change}]))
    with pytest.raises(data.DataError, match=message) as error:
        sources.load_medr1_split(path, image_root=tmp_path)
    assert "X-Ray_test.json, record 0" in str(error.value)
    with pytest.raises(data.DataError, match="cannot be read"):
        sources.load_medr1_split(tmp_path / "CT(Computed Tomography)_test.json", image_root=tmp_path)


def test_nan_pixels_do_not_blacken_a_float_image_and_a_fifo_is_refused(tmp_path):
    pixels = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    pixels[0, 0] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "float.tiff")
    gray = np.asarray(inputs.load_image(str(tmp_path / "float.tiff")))[..., 0]
    assert gray[0, 0] == 0 and gray[-1, -1] == 255 and gray[16, 16] not in (0, 255)
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(data.DataError, match="not a regular file"):
        data.check_images([{"id": "q", "images": [str(tmp_path / "fifo.png")]}])
