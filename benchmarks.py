"""Readers of the other benchmarks' files, giving samples in sources.py's form.

The medical VQA papers after Med-R1 report VQA-RAD, SLAKE, PathVQA, PMC-VQA
and MMMU: here are their Hugging Face parquet files (`load_parquet`), SLAKE's
own JSON (`load_slake`) and PMC-VQA's own CSV (`load_pmc_vqa_csv`). Every row
goes through sources.free_sample, so it is checked as our own JSONL records
are; a bad one raises DataError naming its file and row, or, given an errors
list (--skip_bad_records), is recorded there and skipped.
"""

import ast
import csv
import hashlib
import io
import os
import re
from pathlib import Path

from PIL import UnidentifiedImageError

from inputs import load_image
from sources import (LETTERS_ALL, DataError, check_text, free_sample, inside, kept,
                     read_records, read_text)

# The benchmarks' parquet files on the Hugging Face hub name a question's parts
# differently; column names are compared lower-cased without spaces and
# underscores.
#   VQA-RAD, PathVQA and SLAKE's English mirror: image, question, answer.
#   PMC-VQA's: also choice a-d and answer label ("A:Liver" choices).
#   MMMU: image_1 to image_7, options (a Python list as text), answer (a
#     letter, or text when question_type is "open"), subfield.
#   MedVLThinker's: images (a list), options, answer_label.
#   SLAKE's: also answer_type (OPEN / CLOSED) and q_lang.
#   PMC-VQA's own CSV files: Figure_path, Question, Answer, Choice A-D,
#     Answer_label.
IMAGE_COLUMNS = ["image", "images"] + [f"image{n}" for n in range(1, 8)]
CHOICE_COLUMNS = {"choicea": "A", "choiceb": "B", "choicec": "C", "choiced": "D"}


def column_key(name: str) -> str:
    """A column's name as compared: "Answer_label" and "answer label" are both "answerlabel"."""
    return re.sub(r"[\s_]", "", name.lower())


def check_columns(path: Path, names: list[str], image_column: str, image_keys: set) -> None:
    """The file has a column for each part of a question (image_keys holds the image
    column's keys); DataError naming the columns it has otherwise."""
    keys = {column_key(name) for name in names}
    if not (keys & image_keys and "question" in keys and keys & {"answer", "answerlabel"}):
        raise DataError(f"{path}: needs {image_column}, question and answer; it has {names}")


def text_of(value):
    """A number as text (benchmarks store some answers as numbers); anything else as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


# ---------------------------------------------------------------- parquet files


def load_parquet(path: Path, image_folder: Path, errors: list | None = None) -> list[dict]:
    """A benchmark's parquet file as samples, its English questions where it has a
    q_lang column; each image's bytes are written once to image_folder (named by
    their hash), so the rest of the pipeline reads paths."""
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
    try:
        table = pyarrow.parquet.ParquetFile(path)
    except Exception as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    check_columns(path, table.schema_arrow.names,
                  "an image column (image, images or image_1...)", set(IMAGE_COLUMNS))
    image_folder.mkdir(parents=True, exist_ok=True)
    samples, row = [], 0
    # A few hundred rows at a time: a benchmark's file holds every image's bytes.
    for batch in table.iter_batches(batch_size=256):
        for raw in batch.to_pylist():
            record = {column_key(k): v for k, v in raw.items()}
            if record.get("qlang", "en") == "en":
                where = f"{path}, row {row}"
                kept(samples, lambda: benchmark_sample(
                    record, where, f"{path.name}#{row}",
                    parquet_images(record, image_folder, where)), errors)
            row += 1
    return samples


def parquet_images(record: dict, folder: Path, where: str) -> list[str]:
    """A parquet row's images, in column order, written to folder."""
    cells = []
    for column in IMAGE_COLUMNS:
        value = record.get(column)
        cells += value if isinstance(value, list) else [value]
    cells = [cell for cell in cells if cell is not None]
    return [write_image(cell, folder, where, number) for number, cell in enumerate(cells, 1)]


def write_image(cell, folder: Path, where: str, number: int) -> str:
    """A row's image (its number, for messages) as a file in folder, from its cell: the
    bytes, or {bytes, path} as the datasets library writes them (the path gives the suffix)."""
    content, name = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, "")
    if not isinstance(content, bytes):
        raise DataError(f"{where}: an image cell holds no image bytes: {str(cell)[:80]}")
    path = folder / (hashlib.sha1(content).hexdigest() + Path(name or "").suffix.lower())
    if not path.exists():
        # Decoded here, where the file and row are known: later checks see only the copy.
        try:
            load_image(io.BytesIO(content))
        except Exception as error:
            cause = ("not an image file PIL can read"
                     if isinstance(error, UnidentifiedImageError) else error)
            raise DataError(f"{where}: image {number} does not decode ({cause})") from error
        # Written whole, then renamed: a reader (another rank) never sees half a file.
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(content)
        os.replace(partial, path)
    return str(path)


# ---------------------------------------------------------------- PMC-VQA's CSV files


def load_pmc_vqa_csv(path: Path, errors: list | None = None) -> list[dict]:
    """PMC-VQA as its authors ship it: train.csv, test.csv or test_clean.csv
    beside images/ (from images.zip), whose Figure_path names the image."""
    rows = csv.DictReader(read_text(path).splitlines())
    check_columns(path, rows.fieldnames or [], "a Figure_path column", {"figurepath"})
    samples = []
    for row, raw in enumerate(rows):
        record = {column_key(k): v for k, v in raw.items() if k is not None}
        where = f"{path}, row {row}"
        figure = record.get("figurepath") or ""
        kept(samples, lambda: benchmark_sample(
            record, where, f"{path.name}#{row}",
            [inside(path.parent / "images", figure, where, "Figure_path")]), errors)
    if not samples and errors is None:
        raise DataError(f"{path}: no rows")
    return samples


# ---------------------------------------------------------------- one row of any benchmark


def benchmark_sample(record: dict, where: str, default_id: str, images: list[str]) -> dict:
    """One row of a benchmark's file (column names as column_key makes them), with its images."""
    options = benchmark_options(record, where)
    answer = benchmark_answer(record, options, where)
    sample_id = next((record[k] for k in ("id", "qid") if record.get(k) is not None),
                     default_id)
    return free_sample(where, str(sample_id), images, record.get("question"), answer,
                       options, benchmark_answer_type(record),
                       record.get("modality") or "", record.get("subfield") or "")


def benchmark_options(record: dict, where: str) -> dict | list | None:
    """The options of a multiple-choice row (MMMU's `options`, PMC-VQA's choices), or None."""
    if any(record.get(column) is not None for column in CHOICE_COLUMNS):
        choices = {letter: record.get(column) for column, letter in CHOICE_COLUMNS.items()}
        choices = {letter: text for letter, text in choices.items()
                   if text not in (None, "")}
        check_text(where, {f"choice {letter}": text for letter, text in choices.items()})
        # PMC-VQA writes each choice with its label: "A:Liver", " B: Spleen".
        return {letter: re.sub(rf"^\s*{letter}\s*:\s*", "", text)
                for letter, text in choices.items()}
    options = record.get("options")
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError) as error:
            raise DataError(f"{where}: options {options!r} is not a list") from error
    return options or None


def benchmark_answer(record: dict, options, where: str):
    """The gold answer: a multiple-choice row's answer label where the file has that column
    (PMC-VQA, MedVLThinker), else its answer (MMMU's: the letter)."""
    if options and "answerlabel" in record:
        if record["answerlabel"] in (None, ""):
            raise DataError(f"{where}: the answer label is empty")
        return text_of(record["answerlabel"])
    answer = text_of(record.get("answer"))
    if options and answer not in tuple(LETTERS_ALL):
        raise DataError(f"{where}: the file has no answer label column (PMC-VQA's "
                        f"Answer_label), and its answer {answer!r} is no option's letter")
    return answer


def benchmark_answer_type(record: dict) -> str | None:
    """SLAKE's answer_type or MMMU's question_type, or None to infer it
    (sources.answer_type_of)."""
    if record.get("questiontype") in ("multiple-choice", "open"):
        return "choice" if record["questiontype"] == "multiple-choice" else "open"
    kind = str(record.get("answertype") or "").lower()
    return kind if kind in ("open", "closed") else None


# ---------------------------------------------------------------- SLAKE's JSON files


def load_slake(path: Path, errors: list | None = None) -> list[dict]:
    """SLAKE as its authors ship it (train.json, validation.json, test.json
    beside imgs/): the English questions (q_lang "en"), as the papers report;
    answer_type OPEN or CLOSED."""
    records = read_records(path)
    if records and "img_name" not in records[0]:
        raise DataError(f"{path}: not SLAKE's (its records have no img_name), nor by its "
                        "name a Med-R1 split file (<modality type or question type>_test.json)")
    samples = []
    for index, record in enumerate(records):
        if record.get("q_lang") == "en":
            kept(samples, lambda: slake_sample(record, f"{path}, record {index}", path.parent),
                 errors)
    if not samples and errors is None:
        raise DataError(f"{path}: no English (q_lang en) questions")
    return samples


def slake_sample(record: dict, where: str, folder: Path) -> dict:
    """One record of SLAKE's JSON; its image is imgs/<img_name> beside the file."""
    fields = ("qid", "img_name", "question", "answer", "answer_type")
    missing = [k for k in fields if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    check_text(where, {"img_name": record["img_name"], "answer_type": record["answer_type"]})
    image = inside(folder / "imgs", record["img_name"], where, "img_name")
    return free_sample(where, str(record["qid"]), [image], record["question"],
                       text_of(record["answer"]), None, record["answer_type"].lower(),
                       record.get("modality", ""), record.get("content_type", ""))
