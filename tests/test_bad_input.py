"""Bad input gets a clear error naming the file and record; odd but valid images are converted, not rejected."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
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
    records = [good_record(i, f"Images/Mixed/{name}") for i, name in enumerate([*odd, *[f"plain{i}.png"
                                                                                         for i in range(6)]])]
    bad = {
        "missing-image": {"image_path": "Images/Mixed/nowhere.png"},
        "garbage-image": {"image_path": "Images/Mixed/garbage.png"},
        "truncated-image": {"image_path": "Images/Mixed/truncated.png"},
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
        image = data.load_image(str(root / "Images" / "Mixed" / name))
        assert image.mode == "RGB"
    gray = np.asarray(data.load_image(str(root / "Images" / "Mixed" / "gray16.png")))
    assert gray.min() == 0 and gray.max() == 255  # scaled by its range, not clipped to white
    assert data.load_image(str(root / "Images" / "Mixed" / "huge.png"), 384).size == (384, 384)


@pytest.mark.parametrize("qid, message", [
    ("missing-image", "No such file"), ("garbage-image", "cannot identify image"),
    ("truncated-image", "truncated|broken|Truncated"), ("escaping-path", "leaves the dataset root"),
    ("one-option", "at least 2 options"), ("answer-not-an-option", "matches 0 options"),
    ("no-question", "missing field"),
])
def test_each_bad_record_stops_loading_with_a_message_naming_it(mixed_root, qid, message):
    root, bad = mixed_root
    qa = root / "QA_information" / "Open-access" / "Mixed.json"
    records = [r for r in json.loads(qa.read_text()) if r["question_id"].startswith("ok") or r["question_id"] == qid]
    qa.write_text(json.dumps(records))
    with pytest.raises(data.DataError, match=message) as error:
        data.check_images(data.load_omnimedvqa(root))
    assert qid in str(error.value)


def test_skip_bad_records_trains_on_the_rest_and_counts_them(mixed_root, tiny_path, tmp_path):
    root, bad = mixed_root
    stopped = run_fail(["train.py", "--data", str(root), "--steps", "1", *SMALL, "--output_dir", str(tmp_path)])
    assert "Mixed.json, record 'escaping-path'" in stopped  # the first bad record in the file
    out = run(["train.py", "--data", str(root), "--steps", "2", *SMALL, "--prompts_per_step", "2",
               "--skip_bad_records", "true", "--output_dir", str(tmp_path)])
    assert f"skipped {len(bad)} bad records" in out
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def run_fail(args: list[str]) -> str:
    """Run a script that must fail; return what it printed."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    return done.stdout + done.stderr
