"""Files to sets, splits, checks, prompts and collation of samples.

Every sample has one form (sources.py): id, images, question, options, answer,
answer_type, modality, question_type. Here files are read as sets (the
readers are in sources.py and benchmarks.py), split into training and
held-out sides with no test question (or image) on both, checked before
training (every image decoded, every prompt within the model's positions), and
turned into chat prompts and model inputs.

Shapes: B prompts, G samples per prompt, P prompt tokens.
"""

import glob
import hashlib
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

import benchmarks
import rewards
import sources
from inputs import PromptBatch, load_image, visual_tokens
from sources import DataError, problem_text


def build_prompt(sample: dict, mode: str) -> str:
    """The user text (after the images) for a prompt mode (rewards.MODES) and answer type."""
    return rewards.MODES[mode].text(problem_text(sample), sample.get("answer_type", "choice"))


# ---------------------------------------------------------------- files to sets


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
        resolved = [path.resolve() for path in paths]
        twice = [path for i, path in enumerate(paths) if resolved[i] in resolved[:i]]
        if twice:
            raise DataError(f"{entry}: {twice[0]} is read twice in one set")
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
    return sources.MODALITY_BY_TYPE.get(name, name) if path.suffix == ".json" else path.stem


def file_kind(path: Path) -> str:
    """Which reader takes a file: by its suffix, and a .json file by its name (Med-R1's split
    files are named after a modality or question type; any other is read as SLAKE's)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json":
        return "medr1" if sources.medr1_split_name(path) else "slake"
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
        return sources.load_medr1_split(path, image_root, errors)
    if kind == "slake":
        return benchmarks.load_slake(path, errors)
    if kind == "jsonl":
        return sources.load_jsonl(path, errors)
    if kind == "csv":
        return benchmarks.load_pmc_vqa_csv(path, errors)
    return benchmarks.load_parquet(path, (Path(cache_dir) / "images").resolve(), errors)


def load_set(files: list, image_root, cache_dir, errors: list | None = None) -> list[dict]:
    """The samples of files (load_file) as one set: a test column, or a side of training."""
    return one_per_id([(path, load_file(path, image_root, cache_dir, errors)) for path in files],
                      errors)


def one_per_id(read: list[tuple], errors: list | None = None) -> list[dict]:
    """The samples of (file, samples) pairs as one set, no two with one id: ids name questions
    in messages, eval_results.json and the resume check, so a second record with an id raises
    DataError naming both (with an errors list: is recorded there and dropped)."""
    samples, first = [], {}  # first: id -> the file and question of its first record

    def once(sample: dict, path) -> dict:
        if sample["id"] in first:
            other, question = first[sample["id"]]
            files = path if other == path else f"{other} and {path}"
            raise DataError(f"{files}: the id {sample['id']!r} is given to two records "
                            f"({question!r} and {sample['question']!r}): give each its own id")
        first[sample["id"]] = path, sample["question"]
        return sample

    for path, read_samples in read:
        for sample in read_samples:
            sources.kept(samples, lambda: once(sample, path), errors)
    return samples


def load_splits(root, modalities: list, question_types: list, train_split: str = "",
                test_split: str = "", drop_test_images: bool = True,
                skip_bad_records: bool = False, cache_dir: str = ".cache",
                log=print) -> tuple[list, list]:
    """Train and test samples: no test question is ever trained on; what was held
    apart goes to log.

    Without split files, root is split 80/20 by image as a whole and only then
    filtered, so every image has one side whatever the filters: a model trained
    on one modality never sees a test image of another's. A test split file
    takes its questions (with drop_test_images, every question on its images)
    out of the training side; a Med-R1 train split file without a test file takes
    its questions (images) out of root's test side. Split files are any that
    load_file reads, in read_spec's syntax. Every image is checked once
    here, before training; a bad record raises DataError naming it, or with
    skip_bad_records is dropped and counted.
    """
    def from_files(spec: str) -> list[dict]:
        paths = [path for files in read_spec(spec).values() for path in files]
        return load_set(paths, root, cache_dir, errors)

    train, test, notes, errors = [], [], [], [] if skip_bad_records else None
    if train_split and not test_split and any(
            file_kind(path) != "medr1" for files in read_spec(train_split).values()
            for path in files):
        raise DataError(f"--train_split {train_split}: only Med-R1's split files are tested "
                        "on the rest of --data; pass --test_split too")
    if not (train_split and test_split):
        every = one_per_id([(root, sources.load_omnimedvqa(root, errors=errors))], errors)
        train, test = split_by_image(every)
    train = from_files(train_split) if train_split else train
    test = from_files(test_split) if test_split else test
    # Apart before filtering: a test question of a modality left out is still no training question.
    if test_split:
        train, note = held_apart(train, test, drop_test_images, "training questions",
                                 "the test split")
        notes.append(note)
    elif train_split:
        test, note = held_apart(test, train, drop_test_images,
                                f"held-out questions of {root}", "the train split")
        notes.append(note)
    train = check_images(sources.select(train, modalities, question_types), errors)
    test = check_images(sources.select(test, modalities, question_types), errors)
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


# How benchmarks.write_image names an image from a parquet file: its bytes' SHA-1.
HASH_NAMED = re.compile(r"[0-9a-f]{40}")


def question_key(sample: dict) -> tuple[tuple, str]:
    """What makes two records the same question: the image files, the question and its options."""
    return tuple(sample["images"]), problem_text(sample)


def image_names(sample: dict, root) -> list[str]:
    """Names of the sample's images that hold on any machine: the path relative to root for an
    image inside it, the file name for one written from a parquet file (named by its content's
    hash), the absolute path for any other."""
    root = Path(root).resolve()
    return [os.path.relpath(image, root) if Path(image).is_relative_to(root) else
            Path(image).name if HASH_NAMED.fullmatch(Path(image).stem) else image
            for image in sample["images"]]


def question_id(sample: dict, root) -> str:
    """A short name for a question that holds on any machine: its images relative to root and its
    text, hashed."""
    relative = "\n".join(image_names(sample, root))
    return hashlib.sha1(f"{relative}\n{problem_text(sample)}".encode()).hexdigest()[:16]


def training_record(samples: list[dict], root) -> dict:
    """What a checkpoint trained on (saved beside it): eval.py counts the test questions it saw."""
    return {"images": sorted({image for s in samples for image in image_names(s, root)}),
            "questions": sorted({question_id(s, root) for s in samples})}


def seen_in_training(record: dict, samples: list[dict], root) -> dict:
    """How many of samples' images and questions a checkpoint's training_record holds."""
    images, questions = set(record["images"]), set(record["questions"])
    test_images = {image for s in samples for image in image_names(s, root)}
    return {"test_images": len(test_images), "seen_images": len(test_images & images),
            "seen_questions": sum(question_id(s, root) in questions for s in samples)}


def held_apart(samples: list[dict], other: list[dict], by_image: bool, what: str,
               source: str) -> tuple[list, str]:
    """samples without the questions of other (by_image: without any question on other's images),
    and a note that counts what was removed."""
    questions = {question_key(s) for s in other}
    images = {image for s in other for image in s["images"]}
    kept = [s for s in samples
            if question_key(s) not in questions and not (by_image and images & set(s["images"]))]
    same_question = sum(question_key(s) in questions for s in samples)
    same_image = len({image for s in kept for image in s["images"]} & images)
    removed = len(samples) - len(kept)
    note = (f"{removed} {what} removed: {same_question} are questions of {source}, "
            f"{removed - same_question} share an image with it")
    if same_image:
        note += (f"; {same_image} images of {source} are still on both sides, with other "
                 "questions (--drop_test_images true removes them)")
    return kept, note


def split_by_image(samples: list[dict], test_fraction: float = 0.2, seed: int = 0) -> tuple:
    """A fixed 80/20-style split that keeps all questions of an image on one side.

    Questions that share an image, directly or through another question's
    images, form one unit, named by one of its images. Units are stratified by
    (modality, question type, answer letter of their first question) so the
    test side has the same letter balance as the whole. Rounding per stratum
    can leave every unit of a small modality (or question type) on one side;
    then one of them moves to the other side.
    """
    unit = {}

    def find(image):
        """The image that names image's unit."""
        while unit.setdefault(image, image) != image:
            image = unit[image]
        return image

    for sample in samples:
        for image in sample["images"][1:]:
            unit[find(image)] = find(sample["images"][0])
    by_image = {}
    for sample in samples:
        by_image.setdefault(find(sample["images"][0]), []).append(sample)
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
    train = [s for s in samples if find(s["images"][0]) not in test_images]
    test = [s for s in samples if find(s["images"][0]) in test_images]
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
    paths = sorted({image for s in samples for image in s["images"]})
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        mine = dict(zip(paths[rank::world], pool.map(image_error, paths[rank::world])))
    verdicts = [mine] * world
    if world > 1:
        dist.all_gather_object(verdicts, mine)
    bad = {path: error for verdict in verdicts for path, error in verdict.items() if error}
    for sample in samples:
        for image in [image for image in sample["images"] if image in bad][:1]:
            message = f"record {sample['id']!r}: image {image}: {bad[image]}"
            if errors is None:
                raise DataError(message + "; fix or remove it, or pass --skip_bad_records true")
            errors.append(message)
    return [s for s in samples if not bad.keys() & set(s["images"])]


def check_prompts(samples: list[dict], processor, mode: str, image_size: int, max_pixels: int,
                  positions: int, max_new_tokens: int) -> int:
    """Stop before any model is loaded on an image over max_pixels, or a prompt (text and image
    tokens) that leaves fewer than max_new_tokens of the model's positions: prompts are never
    cut (through the image tokens, or the options). Returns the visual tokens per image."""
    tokens = visual_tokens(processor, image_size)
    # One visual token covers (patch x merge)^2 pixels: 28 x 28 (Qwen2-VL), 32 x 32 (Qwen3-VL).
    side = processor.image_processor.patch_size * processor.image_processor.merge_size
    if max_pixels and tokens * side * side > max_pixels:
        raise DataError(f"the processor makes {tokens} visual tokens per image: more than "
                        "--max_pixels allows")
    texts = [chat_text(processor.tokenizer, s, mode) for s in samples]
    # Each image's one <|image_pad|> in the chat text becomes `tokens` of them.
    lengths = [len(ids) + len(s["images"]) * (tokens - 1)
               for s, ids in zip(samples, processor.tokenizer(texts)["input_ids"])]
    limit = positions - max_new_tokens
    too_long = [(s["id"], n) for s, n in zip(samples, lengths) if n > limit]
    if too_long:
        raise DataError(f"{len(too_long)} prompts are longer than the model's {positions} "
                        f"positions less --max_new_tokens ({limit} tokens), e.g. record "
                        f"{too_long[0][0]!r} with {too_long[0][1]} tokens: lower --image_size "
                        "or --max_new_tokens, or remove those records")
    return tokens


def subset(samples: list[dict], size: int, seed: int) -> list[dict]:
    """size samples (0: all) in a shuffled order, so that a subset keeps the letter balance."""
    shuffled = samples[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[:size or None]


# ---------------------------------------------------------------- collation


def chat_text(tokenizer, sample: dict, mode: str) -> str:
    """The chat-formatted prompt: one user turn, the images first (in order), then the prompt
    text."""
    content = [{"type": "image"} for _ in sample["images"]]
    content.append({"type": "text", "text": build_prompt(sample, mode)})
    message = {"role": "user", "content": content}
    return tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False)


def collate(samples: list[dict], processor, mode: str, image_size: int = 0,
            texts: list[str] | None = None) -> PromptBatch:
    """Chat-format B samples (or take their chat texts) and encode them, images included."""
    texts = texts or [chat_text(processor.tokenizer, s, mode) for s in samples]
    images = []
    for s in samples:
        for path in s["images"]:
            # check_images decoded every image before training; one changed since fails here.
            try:
                images.append(load_image(path, image_size))
            except Exception as error:
                raise DataError(f"record {s['id']!r}: image {path} cannot be decoded: "
                                f"{error}") from error
    return PromptBatch(**processor(texts, images))


def medr1_sft_batch(samples: list[dict], processor, image_size: int) -> tuple:
    """Med-R1's SFT conversations (sources.medr1_sft_text) encoded, and which tokens carry
    loss (B, P): every token but padding and image tokens, as their labels, save the first,
    which has nothing before it."""
    texts = [sources.medr1_sft_text(processor.tokenizer, s) for s in samples]
    batch = collate(samples, processor, "", image_size, texts)
    first = batch.attention_mask.cumsum(dim=1) == 1  # (B, P), the first token and padding
    return batch, batch.attention_mask * (1 - batch.mm_token_type_ids) * ~first  # (B, P)
