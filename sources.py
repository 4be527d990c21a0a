"""Readers of the files datasets ship as, each giving samples in one form: a dict with
    id, images (paths), question, options (letter -> text; empty unless multiple choice),
    answer (the gold letter, or the gold text), answer_type (choice, closed or open),
    modality, question_type.

Readers: OmniMedVQA as distributed (`load_omnimedvqa`), Med-R1's released split
files (`load_medr1_split`), our own JSONL records (`load_jsonl`, format in the
README) and the benchmarks' Hugging Face parquet files (`load_parquet`). Every
bad record raises DataError naming its file and record.
"""

import ast
import glob
import hashlib
import json
import os
import re
from pathlib import Path


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


def read_records(path: Path) -> list[dict]:
    """A JSON file's list of records (UTF-8, a byte-order mark allowed); DataError otherwise."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (byte {error.start}): save it as UTF-8") from error
    try:
        records = json.loads(text)
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
            try:
                samples.append(record_to_sample(record, str(path), root))
            except DataError as error:
                if errors is None:
                    raise
                errors.append(str(error))
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
    if len(options) < 2:
        raise DataError(f"{where}: needs at least 2 options, has {len(options)} in problem "
                        f"{problem!r}")
    return question, options


def load_medr1_split(path, image_root=None) -> list[dict]:
    """Read one of Med-R1's split files ({image, problem, solution} records) as samples."""
    path = Path(path)
    # The file is named after an OmniMedVQA modality_type or a question type, then "_train"/"_test".
    name = path.stem.rsplit("_", 1)[0]
    if name not in MODALITY_BY_TYPE and name not in QUESTION_TYPES:
        raise DataError(f"{path}: the name does not start with a modality type "
                        f"{list(MODALITY_BY_TYPE)} or a question type {QUESTION_TYPES}")
    samples = []
    for index, record in enumerate(read_records(path)):
        where = f"{path}, record {index}"
        missing = [k for k in ("image", "problem", "solution") if k not in record]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        check_text(where, {k: record[k] for k in ("image", "problem", "solution")})
        question, options = parse_problem(record["problem"], where)
        solution = MEDR1_SOLUTION.fullmatch(record["solution"].strip())
        if not solution or solution.group(1) not in options:
            raise DataError(f"{where}: solution {record['solution']!r} names none of the options "
                            f"{list(options)}")
        samples.append({
            "id": f"{path.stem}#{index}",
            "images": [inside(image_root, record["image"], where, "image") if image_root else
                       record["image"]],
            "question": question,
            "options": options,
            "answer": solution.group(1),
            "answer_type": "choice",
            "modality": MODALITY_BY_TYPE.get(name, ""),
            "question_type": name if name in QUESTION_TYPES else "",
        })
    return samples



# ---------------------------------------------------------------- our own records (JSONL)

ANSWER_TYPES = ("choice", "closed", "open")
# Option letters beyond OmniMedVQA's four (MMMU has up to nine options).
LETTERS_ALL = "ABCDEFGHIJ"


def answer_type_of(options: dict, answer: str) -> str:
    """choice with options; closed for a yes/no answer (as VQA-RAD and PathVQA count it); else open."""
    if options:
        return "choice"
    return "closed" if answer.strip().lower() in ("yes", "no") else "open"


def free_sample(where: str, sample_id: str, images: list[str], question: str, answer: str,
                options: dict | list | None = None, answer_type: str | None = None,
                modality: str = "", question_type: str = "") -> dict:
    """One sample from its parts, checked; options may be a list (lettered A, B, ...)."""
    if isinstance(options, list):
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
    if not answer.strip():
        raise DataError(f"{where}: the answer is empty")
    return {"id": sample_id, "images": images, "question": question, "options": options,
            "answer": answer, "answer_type": answer_type, "modality": modality,
            "question_type": question_type}


JSONL_FIELDS = {"id", "images", "image", "question", "answer", "options", "answer_type",
                "modality", "question_type"}


def load_jsonl(path, errors: list | None = None) -> list[dict]:
    """Our record format, one JSON object per line (README: "Your own data"); image paths are
    relative to the file's folder (or absolute). A bad record raises DataError naming its line,
    or with an errors list is recorded there and skipped."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (byte {error.start}): save it as UTF-8") from error
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            samples.append(jsonl_sample(line, where, f"{path.name}#{number}", path.parent))
        except DataError as error:
            if errors is None:
                raise
            errors.append(str(error))
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
    return free_sample(where, str(record.get("id", default_id)),
                       [str((folder / image).resolve()) for image in images],
                       record["question"], record["answer"], record.get("options"),
                       record.get("answer_type"), record.get("modality", ""),
                       record.get("question_type", ""))


# ---------------------------------------------------------------- the benchmarks' parquet files

# The benchmarks' parquet files on the Hugging Face hub name a question's parts differently;
# column names are compared lower-cased without spaces and underscores. VQA-RAD, PathVQA and
# SLAKE's English mirror: image, question, answer. PMC-VQA's: also choice a-d and answer label
# ("A:Liver" choices). MMMU: image_1 to image_7, options (a Python list as text), answer (a
# letter, or text when question_type is "open"), subfield. MedVLThinker's: images (a list),
# options, answer_label.
IMAGE_COLUMNS = ["image", "images"] + [f"image{n}" for n in range(1, 8)]
CHOICE_COLUMNS = ["choicea", "choiceb", "choicec", "choiced"]


def column_key(name: str) -> str:
    """A column's name as compared: "Answer_label" and "answer label" are both "answerlabel"."""
    return re.sub(r"[\s_]", "", name.lower())


def load_parquet(path: Path, image_folder: Path) -> list[dict]:
    """A benchmark's parquet file as samples; each image's bytes are written once to image_folder
    (named by their hash), so the rest of the pipeline reads paths."""
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    columns = {column_key(c) for c in table.column_names}
    image_columns = [c for c in IMAGE_COLUMNS if c in columns]
    if not (image_columns and "question" in columns and columns & {"answer", "answerlabel"}):
        raise DataError(f"{path}: needs an image column (image, images or image_1...), question "
                        f"and answer; it has {table.column_names}")
    image_folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for row, raw in enumerate(table.to_pylist()):
        record = {column_key(k): v for k, v in raw.items()}
        where = f"{path}, row {row}"
        cells = [cell for c in image_columns
                 for cell in (record[c] if isinstance(record[c], list) else [record[c]])
                 if cell is not None]
        options = parquet_options(record, where)
        answer = (options and record.get("answerlabel")) or record.get("answer")
        if answer is None:
            raise DataError(f"{where}: no answer")
        samples.append(free_sample(
            where, str(record.get("id") or record.get("qid") or f"{path.name}#{row}"),
            [write_image(cell, image_folder, where) for cell in cells], record["question"],
            str(answer), options, parquet_answer_type(record), record.get("modality") or "",
            record.get("subfield") or ""))
    return samples


def parquet_options(record: dict, where: str) -> list | dict | None:
    """The options of a multiple-choice row (MMMU's `options`, PMC-VQA's choices), or None."""
    if record.get("choicea") is not None:
        # PMC-VQA writes each choice with its label: "A:Liver", " B: Spleen".
        return [re.sub(r"^\s*[A-D]\s*:\s*", "", record[c]) for c in CHOICE_COLUMNS
                if record.get(c)]
    options = record.get("options")
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError) as error:
            raise DataError(f"{where}: options {options!r} is not a list") from error
    return options or None


def parquet_answer_type(record: dict) -> str | None:
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


def load_slake(path: Path) -> list[dict]:
    """SLAKE as its authors ship it (train.json, validation.json, test.json beside imgs/): the
    English questions (q_lang "en"), as the papers report; answer_type OPEN or CLOSED."""
    samples = []
    for index, record in enumerate(read_records(path)):
        if record.get("q_lang") != "en":
            continue
        where = f"{path}, record {index}"
        missing = [k for k in ("img_name", "question", "answer", "answer_type") if k not in record]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        samples.append(free_sample(
            where, str(record.get("qid", index)),
            [inside(path.parent / "imgs", record["img_name"], where, "img_name")],
            record["question"], str(record["answer"]), None, str(record["answer_type"]).lower(),
            record.get("modality", ""), record.get("content_type", "")))
    if not samples:
        raise DataError(f"{path}: no English (q_lang en) questions")
    return samples


# ---------------------------------------------------------------- any file, and sets of files


def read_spec(spec: str) -> dict[str, list[Path]]:
    """Comma-separated `[name=]file[+file...]` entries -> name -> files; a file may be a glob
    pattern. Unnamed entries are named by default_name."""
    sets = {}
    for entry in filter(None, spec.split(",")):
        name, _, files = entry.rpartition("=")
        paths = []
        for pattern in files.split("+"):
            matches = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [
                Path(pattern)]
            if not matches:
                raise DataError(f"{pattern}: no file matches")
            paths += matches
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


def load_file(path, image_root, cache_dir, errors: list | None = None) -> list[dict]:
    """The samples of one file, read by its kind: .json SLAKE's own or a Med-R1 split file (its
    images under image_root), .jsonl our records, .parquet a benchmark's (images written to
    cache_dir)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json" and "img_name" in (read_records(path)[:1] or [{}])[0]:
        return load_slake(path)
    if path.suffix == ".json":
        return load_medr1_split(path, image_root)
    if path.suffix == ".jsonl":
        return load_jsonl(path, errors)
    if path.suffix == ".parquet":
        return load_parquet(path, Path(cache_dir) / "images")
    raise DataError(f"{path}: not a file this project reads (.json: Med-R1 split, .jsonl: our "
                    "records, .parquet: a benchmark as the Hugging Face hub ships it)")
