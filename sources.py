"""Readers of the files datasets ship as, each giving samples in one form: a dict with
    id, images (paths), question, options (letter -> text; empty unless multiple choice),
    answer (the gold letter, or the gold text), answer_type (choice, closed or open),
    modality, question_type.

Readers: OmniMedVQA as distributed (`load_omnimedvqa`), Med-R1's released split
files (`load_medr1_split`), our own JSONL records (`load_jsonl`, format in the
README), the benchmarks' Hugging Face parquet files (`load_parquet`), SLAKE's
own JSON (`load_slake`) and PMC-VQA's own CSV (`load_pmc_vqa_csv`); `load_file`
picks one by the file. Every bad record
raises DataError naming its file and record, or, given an errors list
(--skip_bad_records), is recorded there and skipped.
"""

import ast
import csv
import glob
import hashlib
import json
import os
import re
from pathlib import Path

import rewards


# Med-R1's names for the 8 modalities -> OmniMedVQA's `modality_type` strings
# (which are also the stems of Med-R1's split files, typos included).
MODALITIES = {
    "CT": "CT(Computed Tomography)",
    "MRI": "MR (Mag-netic Resonance Imaging)",
    "X-Ray": "X-Ray",
    "Ultrasound": "ultrasound",
    "Dermoscopy": "Dermoscopy",
    "Fundus Photography": "Fundus Photography",
    "OCT": "OCT (Optical Coherence Tomography",
    "Microscopy": "Microscopy Images",
}
MODALITY_BY_TYPE = {raw: name for name, raw in MODALITIES.items()}
QUESTION_TYPES = [
    "Modality Recognition",
    "Anatomy Identification",
    "Disease Diagnosis",
    "Lesion Grading",
    "Other Biological Attributes",
]
LETTERS = "ABCD"


# ---------------------------------------------------------------- loading


class DataError(ValueError):
    """A record or file that cannot be used; the message names it."""


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a byte-order mark allowed); DataError naming the file otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (byte {error.start}): save it as UTF-8") from error


def read_records(path: Path) -> list[dict]:
    """A JSON file's list of records; DataError otherwise."""
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno} column "
                        f"{error.colno})") from error
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: must hold a JSON list of records ({{...}} objects), not "
                        f"{type(records).__name__}")
    return records


# Qwen's special tokens look like <|im_end|>: written in a question, the tokenizer would read
# them as control tokens (ending the turn, or adding an image placeholder with no image).
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>")


def check_text(where: str, fields: dict) -> None:
    """Every value must be a string with no special token in it; DataError naming the field."""
    for name, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: {name} must be a string, not {type(value).__name__} "
                            f"{value!r}")
        if token := SPECIAL_TOKEN.search(value):
            raise DataError(f"{where}: {name} holds the special token {token.group(0)!r}, which "
                            "the tokenizer would read as a control token: remove it")


def kept(samples: list, make, errors: list | None) -> None:
    """Append make()'s sample; its DataError raises, or with an errors list is recorded there."""
    try:
        samples.append(make())
    except DataError as error:
        if errors is None:
            raise
        errors.append(str(error))


def inside(root, relative, where: str, field: str) -> str:
    """root / relative, resolved, if it stays inside root; DataError otherwise."""
    path = (Path(root) / relative).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise DataError(f"{where}: {field} {relative!r} leaves the dataset root {root}")
    return str(path)


def record_to_sample(record: dict, source: str, root: Path) -> dict:
    """One OmniMedVQA record -> one sample; raises DataError naming the file and record."""
    where = f"{source}, record {record.get('question_id', '?')!r}"
    fields = ("question_id", "question", "gt_answer", "image_path", "modality_type")
    missing = [k for k in fields if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    beyond = [k for k, v in record.items() if k.startswith("option_")
              and k.removeprefix("option_") not in LETTERS and v not in (None, "")]
    if beyond:
        raise DataError(f"{where}: {beyond} beyond option_D: only options A to D are supported")
    options = {L: record[f"option_{L}"] for L in LETTERS
               if record.get(f"option_{L}") not in (None, "")}
    check_text(where, {k: record[k] for k in (*fields[1:], "question_type") if k in record} |
               {f"option_{L}": text for L, text in options.items()})
    if len(options) < 2:
        raise DataError(f"{where}: needs at least 2 options, has {len(options)}")
    answers = [L for L, text in options.items() if text.strip() == record["gt_answer"].strip()]
    if len(answers) != 1:
        raise DataError(f"{where}: gt_answer {record['gt_answer']!r} matches {len(answers)} "
                        "options, not 1")
    return {
        "id": str(record["question_id"]),
        "images": [inside(root, record["image_path"], where, "image_path")],
        "question": record["question"],
        "options": options,
        "answer": answers[0],
        "answer_type": "choice",
        "modality": MODALITY_BY_TYPE.get(record["modality_type"], record["modality_type"]),
        "question_type": record.get("question_type", ""),
    }


def load_omnimedvqa(root, modalities=None, question_types=None, errors: list | None = None) -> list:
    """Every `QA_information/Open-access/*.json` record under root, of the given modalities and
    question types (None: all).

    A bad record raises DataError; when an errors list is given, its message is
    appended there instead and the record skipped (--skip_bad_records).
    """
    root = Path(root)
    files = sorted((root / "QA_information" / "Open-access").glob("*.json"))
    if not files:
        raise DataError(f"no QA_information/Open-access/*.json under {root}")
    samples = []
    for path in files:
        for record in read_records(path):
            kept(samples, lambda: record_to_sample(record, str(path), root), errors)
    samples = select(samples, modalities, question_types)
    if not samples:
        raise DataError(f"no samples in {root} for modalities={modalities}, "
                        f"question_types={question_types}")
    return samples


def select(samples: list[dict], modalities=None, question_types=None) -> list[dict]:
    """The samples of the given modalities and question types (None or empty: all)."""
    return [s for s in samples if (not modalities or s["modality"] in modalities)
            and (not question_types or s["question_type"] in question_types)]


# Med-R1's `solution` field: the gold letter, space-padded, in an answer tag.
MEDR1_SOLUTION = re.compile(r"<answer>\s*([A-Z])\s*</answer>")


def parse_problem(problem: str, where: str) -> tuple[str, dict]:
    """Med-R1's `problem` string -> (question, options); the inverse of data.problem_text."""
    start = problem.find(" A)")
    if start < 0:
        raise DataError(f"{where}: no ' A)' in problem {problem!r}")
    question, rest = problem[:start], problem[start + len(" A)"):]
    # Option texts hold commas and brackets ("Positron emission tomography (PET)"),
    # so cut only at the next label in order: ", B)", then ", C)", then ", D)".
    options = {}
    for letter, next_letter in zip(LETTERS, LETTERS[1:]):
        cut = rest.find(f", {next_letter})")
        if cut < 0:
            break
        options[letter], rest = rest[:cut], rest[cut + len(", B)"):]
    options[LETTERS[len(options)]] = rest  # the last option runs to the end
    # A second " A)" (in the question, say) or a label past D would make these cuts guess.
    if problem.count(" A)") > 1 or re.search(r", [E-Z]\)", rest):
        raise DataError(f"{where}: cannot tell the options apart in problem {problem!r}: a "
                        "second ' A)', or an option past D")
    if len(options) < 2:
        raise DataError(f"{where}: needs at least 2 options, has {len(options)} in problem "
                        f"{problem!r}")
    return question, options


def load_medr1_split(path, image_root=None, errors: list | None = None) -> list[dict]:
    """Read one of Med-R1's split files ({image, problem, solution} records) as samples."""
    path = Path(path)
    name = medr1_split_name(path)
    if name is None:
        raise DataError(f"{path}: not a Med-R1 split file: the name does not start with a "
                        f"modality type {list(MODALITY_BY_TYPE)} or a question type "
                        f"{QUESTION_TYPES}")
    samples = []
    for index, record in enumerate(read_records(path)):
        kept(samples, lambda: medr1_sample(record, f"{path}, record {index}",
                                           f"{path.stem}#{index}", name, image_root), errors)
    return samples


def medr1_split_name(path: Path) -> str | None:
    """The modality type or question type a Med-R1 split file is named after (before "_train" or
    "_test"), or None."""
    name = path.stem.rsplit("_", 1)[0]
    return name if name in MODALITY_BY_TYPE or name in QUESTION_TYPES else None


def medr1_sample(record: dict, where: str, sample_id: str, name: str, image_root) -> dict:
    """One record of a Med-R1 split file named after name (a modality type or question type)."""
    missing = [k for k in ("image", "problem", "solution") if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    check_text(where, {k: record[k] for k in ("image", "problem", "solution")})
    question, options = parse_problem(record["problem"], where)
    solution = MEDR1_SOLUTION.fullmatch(record["solution"].strip())
    if not solution or solution.group(1) not in options:
        raise DataError(f"{where}: solution {record['solution']!r} names none of the options "
                        f"{list(options)}")
    return {
        "id": sample_id,
        "images": [inside(image_root, record["image"], where, "image") if image_root else
                   record["image"]],
        "question": question,
        "options": options,
        "answer": solution.group(1),
        "answer_type": "choice",
        "modality": MODALITY_BY_TYPE.get(name, ""),
        "question_type": name if name in QUESTION_TYPES else "",
    }


# ---------------------------------------------------------------- questions of any answer type

ANSWER_TYPES = ("choice", "closed", "open")
# Option letters beyond OmniMedVQA's four (MMMU has up to nine options).
LETTERS_ALL = "ABCDEFGHIJ"


def answer_type_of(options: dict, answer: str) -> str:
    """choice with options; closed for a yes/no answer (our rule where a file gives no type);
    else open."""
    if options:
        return "choice"
    return "closed" if rewards.is_yes_no(answer) else "open"


def free_sample(where: str, sample_id: str, images: list[str], question: str, answer: str,
                options: dict | list | None = None, answer_type: str | None = None,
                modality: str = "", question_type: str = "") -> dict:
    """One sample from its parts, checked; options may be a list (lettered A, B, ...)."""
    if isinstance(options, list) and len(options) <= len(LETTERS_ALL):
        options = dict(zip(LETTERS_ALL, options))
    options = options or {}
    if not isinstance(options, dict) or list(options) != list(LETTERS_ALL[:len(options)]):
        raise DataError(f"{where}: options must be a list of texts or an object with the keys "
                        f"A, B, ... in order (at most {len(LETTERS_ALL)}), not {options!r}")
    check_text(where, {"question": question, "answer": answer, "modality": modality,
                       "question_type": question_type} |
               {f"option {letter}": text for letter, text in options.items()})
    if not images or not all(isinstance(image, str) and image for image in images):
        raise DataError(f"{where}: images must be a non-empty list of paths, not {images!r}")
    answer_type = answer_type or answer_type_of(options, answer)
    if answer_type not in ANSWER_TYPES:
        raise DataError(f"{where}: answer_type {answer_type!r} is not one of {ANSWER_TYPES}")
    if (answer_type == "choice") != bool(options):
        raise DataError(f"{where}: answer_type {answer_type!r} " + (
            "needs options" if answer_type == "choice" else "takes no options (use choice)"))
    if options and (len(options) < 2 or answer not in options):
        raise DataError(f"{where}: answer {answer!r} must be the letter of one of at least 2 "
                        f"options {list(options)}")
    # Free-text answers are scored after rewards.normalize_answer: an answer of no words
    # would be matched by an empty one.
    if not (options or rewards.normalize_answer(answer)):
        raise DataError(f"{where}: the answer {answer!r} has no words")
    return {"id": sample_id, "images": images, "question": question, "options": options,
            "answer": answer, "answer_type": answer_type, "modality": modality,
            "question_type": question_type}


def text_of(value):
    """A number as text (benchmarks store some answers as numbers); anything else as it is."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# ---------------------------------------------------------------- our own records (JSONL)

JSONL_FIELDS = {"id", "images", "image", "question", "answer", "options", "answer_type",
                "modality", "question_type"}


def load_jsonl(path, errors: list | None = None) -> list[dict]:
    """Our record format, one JSON object per line (README: "Your own data"); image paths are
    relative to the file's folder (or absolute)."""
    path = Path(path)
    samples = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            kept(samples, lambda: jsonl_sample(line, f"{path}, line {number}",
                                               f"{path.name}#{number}", path.parent), errors)
    if not samples and errors is None:
        raise DataError(f"{path}: no records")
    return samples


def jsonl_sample(line: str, where: str, default_id: str, folder: Path) -> dict:
    """One line of a JSONL file -> one sample; relative image paths are read from folder."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from error
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be a JSON object, not {type(record).__name__}")
    unknown = sorted(set(record) - JSONL_FIELDS)
    missing = [k for k in ("question", "answer") if k not in record]
    if unknown or missing or ("image" in record) == ("images" in record):
        raise DataError(f"{where}: needs question, answer and one of image or images"
                        f" (missing {missing or 'none'}; unknown fields {unknown or 'none'})")
    images = record["images"] if "images" in record else [record["image"]]
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise DataError(f"{where}: images must be a list of paths, not {images!r}")
    sample_id = record.get("id")
    return free_sample(where, default_id if sample_id is None else str(sample_id),
                       [str((folder / image).resolve()) for image in images],
                       record["question"], record["answer"], record.get("options"),
                       record.get("answer_type"), record.get("modality", ""),
                       record.get("question_type", ""))


# ---------------------------------------------------------------- the benchmarks' own files

# The benchmarks' parquet files on the Hugging Face hub name a question's parts differently;
# column names are compared lower-cased without spaces and underscores. VQA-RAD, PathVQA and
# SLAKE's English mirror: image, question, answer. PMC-VQA's: also choice a-d and answer label
# ("A:Liver" choices). MMMU: image_1 to image_7, options (a Python list as text), answer (a
# letter, or text when question_type is "open"), subfield. MedVLThinker's: images (a list),
# options, answer_label. SLAKE's: also answer_type (OPEN / CLOSED) and q_lang. PMC-VQA's own
# CSV files: Figure_path, Question, Answer, Choice A-D, Answer_label.
IMAGE_COLUMNS = ["image", "images"] + [f"image{n}" for n in range(1, 8)]
CHOICE_COLUMNS = {"choicea": "A", "choiceb": "B", "choicec": "C", "choiced": "D"}


def column_key(name: str) -> str:
    """A column's name as compared: "Answer_label" and "answer label" are both "answerlabel"."""
    return re.sub(r"[\s_]", "", name.lower())


def load_parquet(path: Path, image_folder: Path, errors: list | None = None) -> list[dict]:
    """A benchmark's parquet file as samples, its English questions where it has a q_lang column;
    each image's bytes are written once to image_folder (named by their hash), so the rest of
    the pipeline reads paths."""
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
    try:
        table = pyarrow.parquet.ParquetFile(path)
    except Exception as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    columns = {column_key(c) for c in table.schema_arrow.names}
    if not (columns & set(IMAGE_COLUMNS) and "question" in columns
            and columns & {"answer", "answerlabel"}):
        raise DataError(f"{path}: needs an image column (image, images or image_1...), question "
                        f"and answer; it has {table.schema_arrow.names}")
    image_folder.mkdir(parents=True, exist_ok=True)
    samples, row = [], 0
    # A few hundred rows at a time: a benchmark's file holds every image's bytes.
    for batch in table.iter_batches(batch_size=256):
        for raw in batch.to_pylist():
            record = {column_key(k): v for k, v in raw.items()}
            if record.get("qlang", "en") == "en":
                where = f"{path}, row {row}"
                kept(samples, lambda: benchmark_sample(record, where, f"{path.name}#{row}",
                                                       parquet_images(record, image_folder, where)),
                     errors)
            row += 1
    return samples


def parquet_images(record: dict, folder: Path, where: str) -> list[str]:
    """A parquet row's images, in column order, written to folder."""
    cells = [cell for column in IMAGE_COLUMNS if record.get(column) is not None
             for cell in (record[column] if isinstance(record[column], list) else [record[column]])
             if cell is not None]
    return [write_image(cell, folder, where) for cell in cells]


def load_pmc_vqa_csv(path: Path, errors: list | None = None) -> list[dict]:
    """PMC-VQA as its authors ship it: train.csv, test.csv or test_clean.csv beside images/ (from
    images.zip), whose Figure_path names the image."""
    samples = []
    for row, raw in enumerate(csv.DictReader(read_text(path).splitlines())):
        record = {column_key(k): v for k, v in raw.items() if k is not None}
        where = f"{path}, row {row}"
        kept(samples, lambda: benchmark_sample(record, where, f"{path.name}#{row}", [inside(
            path.parent / "images", record.get("figurepath") or "", where, "Figure_path")]),
            errors)
    if not samples and errors is None:
        raise DataError(f"{path}: no rows")
    return samples


def benchmark_sample(record: dict, where: str, default_id: str, images: list[str]) -> dict:
    """One row of a benchmark's file (column names as column_key makes them), with its images."""
    options = benchmark_options(record, where)
    answer = text_of((options and record.get("answerlabel")) or record.get("answer"))
    sample_id = next((record[k] for k in ("id", "qid") if record.get(k) is not None), default_id)
    return free_sample(where, str(sample_id), images, record.get("question"), answer, options,
                       benchmark_answer_type(record), record.get("modality") or "",
                       record.get("subfield") or "")


def benchmark_options(record: dict, where: str) -> dict | list | None:
    """The options of a multiple-choice row (MMMU's `options`, PMC-VQA's choices), or None."""
    if any(record.get(column) is not None for column in CHOICE_COLUMNS):
        choices = {letter: record.get(column) for column, letter in CHOICE_COLUMNS.items()}
        choices = {letter: text for letter, text in choices.items() if text not in (None, "")}
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
    """SLAKE's answer_type or MMMU's question_type, or None to infer it (answer_type_of)."""
    if record.get("questiontype") in ("multiple-choice", "open"):
        return "choice" if record["questiontype"] == "multiple-choice" else "open"
    kind = str(record.get("answertype") or "").lower()
    return kind if kind in ("open", "closed") else None


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


def load_slake(path: Path, errors: list | None = None) -> list[dict]:
    """SLAKE as its authors ship it (train.json, validation.json, test.json beside imgs/): the
    English questions (q_lang "en"), as the papers report; answer_type OPEN or CLOSED."""
    records = read_records(path)
    if records and "img_name" not in records[0]:
        raise DataError(f"{path}: not SLAKE's (its records have no img_name), nor by its name a "
                        "Med-R1 split file (<modality type or question type>_test.json)")
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
    missing = [k for k in ("qid", "img_name", "question", "answer", "answer_type")
               if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    check_text(where, {"img_name": record["img_name"], "answer_type": record["answer_type"]})
    return free_sample(where, str(record["qid"]),
                       [inside(folder / "imgs", record["img_name"], where, "img_name")],
                       record["question"], text_of(record["answer"]), None,
                       record["answer_type"].lower(), record.get("modality", ""),
                       record.get("content_type", ""))


# ---------------------------------------------------------------- any file, and sets of files


def read_spec(spec: str) -> dict[str, list[Path]]:
    """Comma-separated `[name=]file[+file...]` entries -> name -> files, in order; a file may be
    a glob pattern. Unnamed entries are named by default_name."""
    sets = {}
    for entry in filter(None, spec.split(",")):
        name, _, files = entry.rpartition("=")
        paths = []
        for pattern in files.split("+"):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise DataError(f"{pattern}: no file matches")
            paths += map(Path, matches)
        name = name or default_name(paths[0])
        if name in sets:
            raise DataError(f"{entry}: a second set named {name!r}: name each set (name=file)")
        sets[name] = paths
    return sets


def default_name(path: Path) -> str:
    """A set's name from its first file: a Med-R1 split file's modality or question type, else
    the file's stem, or the dataset's folder (the one above data/) where the stem only names a
    split (test.json, test-00000-of-00001.parquet)."""
    if re.fullmatch(r"(train|test|validation|val|dev)([-_.].*)?", path.stem):
        return next((p.name for p in path.resolve().parents if p.name not in ("data", "")),
                    path.stem)
    name = path.stem.rsplit("_", 1)[0]
    return MODALITY_BY_TYPE.get(name, name) if path.suffix == ".json" else path.stem


def file_kind(path: Path) -> str:
    """Which reader takes a file: by its suffix, and a .json file by its name (Med-R1's split
    files are named after a modality or question type; any other is read as SLAKE's)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json":
        return "medr1" if medr1_split_name(path) else "slake"
    if path.suffix in (".jsonl", ".parquet", ".csv"):
        return path.suffix[1:]
    raise DataError(f"{path}: not a file this project reads (.json: Med-R1 split or SLAKE, "
                    ".jsonl: our records, .parquet: a benchmark as the Hugging Face hub ships it, "
                    ".csv: PMC-VQA)")


def load_file(path, image_root, cache_dir, errors: list | None = None) -> list[dict]:
    """The samples of one file (file_kind): a Med-R1 split file's images are under image_root, a
    parquet file's are written to cache_dir/images."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "medr1":
        return load_medr1_split(path, image_root, errors)
    if kind == "slake":
        return load_slake(path, errors)
    if kind == "jsonl":
        return load_jsonl(path, errors)
    if kind == "csv":
        return load_pmc_vqa_csv(path, errors)
    return load_parquet(path, (Path(cache_dir) / "images").resolve(), errors)
