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
import os
import re
from pathlib import Path

from sources import DataError, check_text, free_sample, inside, kept, read_records, read_text

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
    names = table.schema_arrow.names
    columns = {column_key(c) for c in names}
    if not (columns & set(IMAGE_COLUMNS) and "question" in columns
            and columns & {"answer", "answerlabel"}):
        raise DataError(f"{path}: needs an image column (image, images or image_1...), "
                        f"question and answer; it has {names}")
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
    return [write_image(cell, folder, where) for cell in cells if cell is not None]


def write_image(cell, folder: Path, where: str) -> str:
    """An image cell ({bytes, path}, as the datasets library writes them) as a file in folder."""
    if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
        raise DataError(f"{where}: an image cell holds no image bytes: {str(cell)[:80]}")
    digest = hashlib.sha1(cell["bytes"]).hexdigest()
    path = folder / (digest + Path(cell.get("path") or "").suffix.lower())
    if not path.exists():
        # Written whole, then renamed: a reader (another rank) never sees half a file.
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(cell["bytes"])
        os.replace(partial, path)
    return str(path)


# ---------------------------------------------------------------- PMC-VQA's CSV files


def load_pmc_vqa_csv(path: Path, errors: list | None = None) -> list[dict]:
    """PMC-VQA as its authors ship it: train.csv, test.csv or test_clean.csv
    beside images/ (from images.zip), whose Figure_path names the image."""
    samples = []
    for row, raw in enumerate(csv.DictReader(read_text(path).splitlines())):
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
    answer = text_of((options and record.get("answerlabel")) or record.get("answer"))
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
