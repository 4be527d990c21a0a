"""No test question is ever trained on: every combination of split files and filters, held apart."""

from pathlib import Path

import pytest

import data
import sources
import tiny
from helpers import write_medr1_split

CT_TRAIN, CT_TEST, MRI_TEST = ("CT(Computed Tomography)_train.json",
                               "CT(Computed Tomography)_test.json",
                               "MR (Mag-netic Resonance Imaging)_test.json")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small root in OmniMedVQA's layout and Med-R1-style split files that overlap the root's
    own split.

    The CT train file holds the CT questions of three types on every CT image, the
    CT test file those of three types on the images from the 8th on: one type in
    both (the same questions), and those images in both; the MRI test file holds
    every MRI question, most of them on the training side of the root's own 80/20
    split.
    """
    root = tiny.make_synthetic(tmp_path_factory.mktemp("omnimedvqa"), images_per_modality=20,
                               fixed_order=False)
    ct = sources.load_omnimedvqa(root, modalities=["CT"])
    first_types = [s for s in ct if s["question_type"] in sources.QUESTION_TYPES[:3]]
    last_types = [s for s in ct if s["question_type"] in sources.QUESTION_TYPES[2:]]
    write_medr1_split(root / CT_TRAIN, first_types, root)
    write_medr1_split(root / CT_TEST, [s for s in last_types
                                       if Path(s["images"][0]).stem >= "00008"], root)
    write_medr1_split(root / MRI_TEST, sources.load_omnimedvqa(root, modalities=["MRI"]), root)
    return root


def questions(samples):
    return {data.question_key(s) for s in samples}


def images(samples):
    return {s["images"][0] for s in samples}


SPLIT_FLAGS = {"no files": ("", ""), "train file": (CT_TRAIN, ""),
               "test files": ("", f"{CT_TEST},{MRI_TEST}"), "both files": (CT_TRAIN, CT_TEST)}
FILTERS = {"all": ([], []), "CT": (["CT"], []), "MRI": (["MRI"], []),
           "Disease Diagnosis": ([], ["Disease Diagnosis"])}


@pytest.mark.parametrize("drop_test_images", [True, False])
@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("flags", SPLIT_FLAGS)
def test_no_test_question_is_ever_trained_on(root, flags, filters, drop_test_images):
    train_split, test_split = [",".join(str(root / f) for f in files.split(",")) if files else ""
                               for files in SPLIT_FLAGS[flags]]
    modalities, question_types = FILTERS[filters]
    # A file named after a modality holds no question types and only that modality; the MRI
    # test file holds every MRI question, and the CT train file every CT image, so that one
    # leaves the root no CT image to test on.
    error = ("no training samples" if (train_split and (question_types or modalities == ["MRI"])) or
             (flags, filters) == ("test files", "MRI") else
             "no test samples" if test_split and question_types else
             "pass --test_split" if (flags, filters, drop_test_images) == ("train file", "CT", True)
             else None)
    if error:
        with pytest.raises(data.DataError, match=error):
            data.load_splits(root, modalities, question_types, train_split, test_split,
                             drop_test_images, log=lambda note: None)
        return
    notes = []
    train, held_out = data.load_splits(root, modalities, question_types, train_split, test_split,
                                       drop_test_images, log=notes.append)
    assert train and held_out
    # Every test set evaluation can use: the held-out side train.py evaluates on, the given
    # test files whole (any modality), and, unless a train file was given, the root's own
    # test side whole (eval.py without split files, with any filter).
    test_sets = [held_out] + [sources.load_medr1_split(root / f, image_root=root) for f in
                              SPLIT_FLAGS[flags][1].split(",") if f]
    if not train_split:
        test_sets.append(data.load_splits(root, [], [], log=notes.append)[1])
    for test in test_sets:
        assert not questions(train) & questions(test)
        if drop_test_images or not (train_split or test_split):
            assert not images(train) & images(test)
    if drop_test_images and test_split:
        assert "share an image" in notes[0] and "still on both sides" not in notes[0]


def test_an_image_in_both_files_is_noted_unless_dropped(root):
    train_split, test_split = str(root / CT_TRAIN), str(root / CT_TEST)
    every_train = sources.load_medr1_split(train_split, image_root=root)
    notes = []
    train, test = data.load_splits(root, [], [], train_split, test_split, drop_test_images=False,
                                   log=notes.append)
    [note] = notes
    # By hand: the Disease Diagnosis questions are in both files, and every image of the test file
    # also holds a training question of another type.
    in_test = [s for s in every_train if data.question_key(s) in questions(test)]
    shared = [s for s in in_test if s["question_type"] == ""]
    assert len(shared) == len(in_test) > 0
    assert len(train) == len(every_train) - len(shared)
    assert note.startswith(f"{len(shared)} training questions removed: {len(shared)} are "
                           "questions of the test split")
    assert f"{len(images(test))} images of the test split are still on both sides" in note
    notes.clear()
    dropped, _ = data.load_splits(root, [], [], train_split, test_split, drop_test_images=True,
                                  log=notes.append)
    [note] = notes
    assert not images(dropped) & images(test) and len(dropped) < len(train)
    assert "still on both sides" not in note


def test_a_train_file_over_the_test_side_needs_a_test_split(root, tmp_path):
    train_file = tmp_path / "CT(Computed Tomography)_train.json"
    write_medr1_split(train_file, sources.load_omnimedvqa(root), root)
    with pytest.raises(data.DataError, match="pass --test_split"):
        data.load_splits(root, [], [], str(train_file), log=print)


def test_the_root_is_split_before_it_is_filtered(root):
    train, test = data.load_splits(root, [], [])
    for modalities, question_types in FILTERS.values():
        filtered_train, filtered_test = data.load_splits(root, modalities, question_types)
        assert filtered_train == sources.select(train, modalities, question_types)
        assert filtered_test == sources.select(test, modalities, question_types)


def test_the_training_record_counts_seen_test_items(root):
    train, test = data.load_splits(root, [], [])
    record = data.training_record(train[:10] + test[:3], root)
    # Relative: holds on any machine.
    assert all(not path.startswith("/") for path in record["images"])
    seen = data.seen_in_training(record, test, root)
    assert seen == {"test_images": len(images(test)), "seen_images": len(images(test[:3])),
                    "seen_questions": 3}


def test_a_small_modality_gets_an_image_on_each_side():
    """72 images over 6 modalities, as in a small real collection: the 3 fundus images each have
    their own answer letter, so rounding per stratum alone would test on none of them."""
    samples = []
    for m, modality in enumerate(["CT", "MRI", "X-Ray", "OCT", "Microscopy"]):
        samples += [{"images": [f"{modality}/{i}.png"], "modality": modality,
                     "answer": "ABCD"[i % 4], "question_type": "Modality Recognition"}
                    for i in range(69 // 5 + (m < 69 % 5))]
    samples += [{"images": [f"Fundus/{i}.png"], "modality": "Fundus Photography",
                 "answer": "ABC"[i], "question_type": "Modality Recognition"} for i in range(3)]
    assert len(samples) == 72
    train, test = data.split_by_image(samples)
    for modality in {s["modality"] for s in samples}:
        assert any(s["modality"] == modality for s in train), modality
        assert any(s["modality"] == modality for s in test), modality
    assert 0.15 <= len(test) / len(samples) <= 0.3
