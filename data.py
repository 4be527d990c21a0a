"""Datasets, prompts and collation.

One sample form for every source: a dict with
    id, image (path), question, options (letter -> text), answer (letter),
    modality, question_type.
Sources: OmniMedVQA as distributed (`load_omnimedvqa`), Med-R1's released
split files (`load_medr1_split`) and a synthetic generator that writes
OmniMedVQA's layout offline (`make_synthetic`).

Shapes: B prompts, G samples per prompt, P prompt tokens.
"""

import hashlib
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

import rewards
from inputs import PromptBatch, load_image

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

def problem_text(sample: dict) -> str:
    """Med-R1's `problem` string: the question, a space, then `A)text, B)text, ...`."""
    options = ", ".join(f"{letter}){text}" for letter, text in sample["options"].items())
    return f"{sample['question']} {options}"


def build_prompt(sample: dict, mode: str) -> str:
    """The user text (after the image) for a prompt mode (rewards.MODES)."""
    return rewards.MODES[mode].template.format(problem=problem_text(sample))


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
        "image": inside(root, record["image_path"], where, "image_path"),
        "question": record["question"],
        "options": options,
        "answer": answers[0],
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
            "image": inside(image_root, record["image"], where, "image") if image_root else
            record["image"],
            "question": question,
            "options": options,
            "answer": solution.group(1),
            "modality": MODALITY_BY_TYPE.get(name, ""),
            "question_type": name if name in QUESTION_TYPES else "",
        })
    return samples


def random_guess_accuracy(samples: list[dict]) -> float:
    """The expected accuracy of picking one option uniformly at random, averaged over samples."""
    return sum(1 / len(s["options"]) for s in samples) / len(samples)


def load_splits(root, modalities: list, question_types: list, train_split: str = "",
                test_split: str = "", drop_test_images: bool = True, skip_bad_records: bool = False,
                log=print) -> tuple[list, list]:
    """Train and test samples: no test question is ever trained on; what was held apart goes to log.

    Without split files, root is split 80/20 by image as a whole and only then
    filtered, so every image has one side whatever the filters: a model trained
    on one modality never sees a test image of another's. A test split file
    takes its questions (with drop_test_images, every question on its images)
    out of the training side; a train split file without a test file takes its
    questions (images) out of root's test side. Every image is checked once
    here, before training; a bad record raises DataError naming it, or with
    skip_bad_records is dropped and counted.
    """
    def from_files(files: str) -> list[dict]:
        return [s for f in files.split(",") for s in load_medr1_split(f, image_root=root)]

    train, test, notes, errors = [], [], [], [] if skip_bad_records else None
    if not (train_split and test_split):
        train, test = split_by_image(load_omnimedvqa(root, errors=errors))
    train = from_files(train_split) if train_split else train
    test = from_files(test_split) if test_split else test
    # Apart before filtering: a test question of a modality left out is still no training question.
    if test_split:
        train, note = held_apart(train, test, drop_test_images, "training questions",
                                 "the test split")
        notes.append(note)
    elif train_split:
        test, note = held_apart(test, train, drop_test_images, "held-out questions of " + str(root),
                                "the train split")
        notes.append(note)
    train = check_images(select(train, modalities, question_types), errors)
    test = check_images(select(test, modalities, question_types), errors)
    selection = f"modalities={modalities}, question_types={question_types}"
    if not train:
        raise DataError(f"no training samples in {train_split or root} for {selection}"
                        + (f" ({notes[0]})" if notes else ""))
    if not test:
        hint = (f" ({notes[0]}): pass --test_split with the test file that matches --train_split"
                if train_split and not test_split else "")
        raise DataError(f"no test samples in {test_split or root} for {selection}{hint}")
    if errors:
        notes.append(f"skipped {len(errors)} bad records; the first: {errors[0]}")
    for note in notes:
        log(note)
    return train, test


def question_key(sample: dict) -> tuple[str, str]:
    """What makes two records the same question: the image file, the question and its options."""
    return sample["image"], problem_text(sample)


def question_id(sample: dict, root) -> str:
    """A short name for a question that holds on any machine: its image relative to root and its
    text, hashed."""
    image, problem = question_key(sample)
    relative = os.path.relpath(image, Path(root).resolve())
    return hashlib.sha1(f"{relative}\n{problem}".encode()).hexdigest()[:16]


def training_record(samples: list[dict], root) -> dict:
    """What a checkpoint trained on (saved beside it): eval.py counts the test questions it saw."""
    return {"images": sorted({os.path.relpath(s["image"], Path(root).resolve()) for s in samples}),
            "questions": sorted({question_id(s, root) for s in samples})}


def seen_in_training(record: dict, samples: list[dict], root) -> dict:
    """How many of samples' images and questions a checkpoint's training_record holds."""
    images, questions = set(record["images"]), set(record["questions"])
    test_images = {os.path.relpath(s["image"], Path(root).resolve()) for s in samples}
    return {"test_images": len(test_images), "seen_images": len(test_images & images),
            "seen_questions": sum(question_id(s, root) in questions for s in samples)}


def held_apart(samples: list[dict], other: list[dict], by_image: bool, what: str,
               source: str) -> tuple[list, str]:
    """samples without the questions of other (by_image: without any question on other's images),
    and a note that counts what was removed."""
    questions, images = {question_key(s) for s in other}, {s["image"] for s in other}
    kept = [s for s in samples
            if question_key(s) not in questions and not (by_image and s["image"] in images)]
    same_question = sum(question_key(s) in questions for s in samples)
    same_image = len({s["image"] for s in kept} & images)
    removed = len(samples) - len(kept)
    note = (f"{removed} {what} removed: {same_question} are questions of {source}, "
            f"{removed - same_question} share an image with it")
    if same_image:
        note += (f"; {same_image} images of {source} are still on both sides, with other questions "
                 "(--drop_test_images true removes them)")
    return kept, note


def split_by_image(samples: list[dict], test_fraction: float = 0.2, seed: int = 0) -> tuple:
    """A fixed 80/20-style split that keeps all questions of an image on one side.

    Images are stratified by (modality, question type, answer letter of their
    first question) so the test side has the same letter balance as the whole.
    Rounding per stratum can leave every image of a small modality (or question
    type) on one side; then one of them moves to the other side.
    """
    by_image = {}
    for sample in samples:
        by_image.setdefault(sample["image"], []).append(sample)
    strata = {}
    for image, group in sorted(by_image.items()):
        key = (group[0]["modality"], group[0]["question_type"], group[0]["answer"])
        strata.setdefault(key, []).append(image)
    rng = random.Random(seed)
    test_images = set()
    for key in sorted(strata):
        images = strata[key]
        rng.shuffle(images)
        test_images.update(images[: round(len(images) * test_fraction)])
    for field in ("modality", "question_type"):
        groups = {}
        for image, group in sorted(by_image.items()):
            groups.setdefault(group[0][field], []).append(image)
        for images in groups.values():
            tested = [image for image in images if image in test_images]
            if len(images) >= 2 and not tested:
                test_images.add(images[0])
            elif len(images) >= 2 and len(tested) == len(images):
                test_images.discard(tested[0])
    train = [s for s in samples if s["image"] not in test_images]
    test = [s for s in samples if s["image"] in test_images]
    return train, test


def image_error(path: str) -> str | None:
    """Why the image at path cannot be trained on, or None: it is decoded exactly as training will
    decode it, so a file truncated after a valid header is caught here too."""
    try:
        # A FIFO or device would hang the open; a folder is no image either.
        if not Path(path).is_file():
            return "not a regular file" if Path(path).exists() else "no such file"
        load_image(path)
    except Exception as error:
        return str(error) or type(error).__name__
    return None


def check_images(samples: list[dict], errors: list | None = None) -> list[dict]:
    """Decode every image once, before training: a bad one raises DataError naming its record (or,
    with an errors list, is recorded there and its records dropped).

    The images are shared out over the ranks and decoded on threads (PIL
    decodes without the GIL); the verdicts are then gathered on every rank.
    """
    paths = sorted({s["image"] for s in samples})
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        mine = dict(zip(paths[rank::world], pool.map(image_error, paths[rank::world])))
    verdicts = [mine] * world
    if world > 1:
        dist.all_gather_object(verdicts, mine)
    bad = {path: error for verdict in verdicts for path, error in verdict.items() if error}
    for sample in samples:
        if sample["image"] in bad:
            message = f"record {sample['id']!r}: image {sample['image']}: {bad[sample['image']]}"
            if errors is None:
                raise DataError(message + "; fix or remove it, or pass --skip_bad_records true")
            errors.append(message)
    return [s for s in samples if s["image"] not in bad]


def check_prompt_lengths(samples: list[dict], tokenizer, mode: str, visual_tokens: int,
                         limits: dict[str, int]) -> None:
    """Stop before training if a prompt (chat text and image tokens) is longer than a limit; limits
    maps what each limit is (for the message) to its tokens (0: none).

    Prompts are never truncated: cutting through the image tokens would break
    the model's forward, cutting the options would change the question.
    """
    texts = [chat_text(tokenizer, s, mode) for s in samples]
    # The one <|image_pad|> of each chat text becomes visual_tokens of them.
    lengths = [len(ids) - 1 + visual_tokens for ids in tokenizer(texts)["input_ids"]]
    for what, limit in limits.items():
        too_long = [(s["id"], n) for s, n in zip(samples, lengths) if limit and n > limit]
        if too_long:
            raise DataError(f"{len(too_long)} prompts are longer than {what} ({limit} tokens), "
                            f"e.g. record {too_long[0][0]!r} with {too_long[0][1]} tokens: raise "
                            "that limit, lower --image_size, or remove those records")


# ---------------------------------------------------------------- collation


def chat_text(tokenizer, sample: dict, mode: str) -> str:
    """The chat-formatted prompt: one user turn, the image first, then the prompt text."""
    content = [{"type": "image"}, {"type": "text", "text": build_prompt(sample, mode)}]
    message = {"role": "user", "content": content}
    return tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False)


def collate(samples: list[dict], processor, mode: str, image_size: int | None = None):
    """Chat-format B samples and encode them, images included."""
    texts = [chat_text(processor.tokenizer, s, mode) for s in samples]
    images = []
    for s in samples:
        # check_images decoded every image before training; a file changed since still fails here.
        try:
            images.append(load_image(s["image"], image_size))
        except Exception as error:
            raise DataError(f"record {s['id']!r}: image {s['image']} cannot be decoded: "
                            f"{error}") from error
    return PromptBatch(**processor(texts, images))
