"""Readers of the paper's files, each giving samples in one form: a dict with
    id, images (paths), question, options (letter -> text; empty unless
    multiple choice), answer (the gold letter, or the gold text), answer_type
    (choice, closed or open), modality, question_type.

Readers: OmniMedVQA as distributed (`load_omnimedvqa`), Med-R1's released
split files (`load_medr1_split`) and our own JSONL records (`load_jsonl`,
format in the README). The other benchmarks' files are read in benchmarks.py
with the checks here (`free_sample`); data.load_file picks a reader by the
file. Every bad record raises DataError naming its file and record, or, given
an errors list (--skip_bad_records), is recorded there and skipped.
"""

import json
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
    """root / relative, resolved, if relative is a path that stays inside root; DataError
    otherwise."""
    # An empty path would name root itself, found only later as "not a regular file".
    if not relative:
        raise DataError(f"{where}: {field} is empty")
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


def load_omnimedvqa(root, modalities=None, question_types=None,
                    errors: list | None = None) -> list:
    """Every `QA_information/Open-access/*.json` record under root, of the given
    modalities and question types (None: all).

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


def problem_text(sample: dict) -> str:
    """Med-R1's `problem` string: the question, a space, then `A)text, B)text, ...`; a question
    without options is itself."""
    if not sample["options"]:
        return sample["question"]
    options = ", ".join(f"{letter}){text}" for letter, text in sample["options"].items())
    return f"{sample['question']} {options}"


# Med-R1's released SFT (PROMPTS.md, "SFT baseline as released"): its system turn, and the
# assistant text "{thinking}\n\n{solution}", where a record without thinking gives "None".
MEDR1_SFT_SYSTEM = ("Your task: Provide the correct single-letter choice (A, B, C, D,...) "
                    "inside <answer>...</answer> tags.")


def medr1_sft_text(tokenizer, sample: dict) -> str:
    """Med-R1's SFT conversation as one chat text: its system turn, the user turn with the
    problem before the images, the answer, and then, as its script applies the chat template
    with add_generation_prompt=True, an empty assistant header."""
    user = [{"type": "text", "text": problem_text(sample)}]
    user += [{"type": "image"} for _ in sample["images"]]
    answer = f"None\n\n<answer> {sample['answer']} </answer>"
    messages = [{"role": "system", "content": MEDR1_SFT_SYSTEM},
                {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def parse_problem(problem: str, where: str) -> tuple[str, dict]:
    """Med-R1's `problem` string -> (question, options); the inverse of problem_text."""
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
    if unknown:
        raise DataError(f"{where}: unknown fields {unknown}; a record's fields are "
                        f"{sorted(JSONL_FIELDS)}")
    missing = [k for k in ("question", "answer") if k not in record]
    if "image" not in record and "images" not in record:
        missing.append("image or images")
    if missing:
        raise DataError(f"{where}: missing {missing}")
    sample_id = default_id if record.get("id") is None else record["id"]
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise DataError(f"{where}: id must be a string or a whole number, not {sample_id!r}")
    return free_sample(where, str(sample_id),
                       [str((folder / image).resolve()) for image in jsonl_images(record, where)],
                       record["question"], record["answer"], record.get("options"),
                       record.get("answer_type"), record.get("modality", ""),
                       record.get("question_type", ""))


def jsonl_images(record: dict, where: str) -> list:
    """A JSONL record's image paths: its image (one path) or its images (a list), not both."""
    if "image" in record and "images" in record:
        raise DataError(f"{where}: gives both image ({record['image']!r}) and images: give "
                        "one of image or images")
    if "image" in record and not isinstance(record["image"], str):
        raise DataError(f"{where}: image must be a path, not {record['image']!r}")
    images = record["images"] if "images" in record else [record["image"]]
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise DataError(f"{where}: images must be a list of paths, not {images!r}")
    return images
