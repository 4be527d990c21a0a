"""Greedy evaluation and the paper's tables.

    python eval.py                  # the tiny default's checkpoint on its held-out questions
    torchrun --nproc_per_node 8 eval.py --checkpoints runs/ct/final,runs/mri/final,... \
        --split_files "splits/CT(Computed Tomography)_test.json,..." --data /data/OmniMedVQA

A test set is any file data.load_file reads (Med-R1's split files, our
JSONL, the benchmarks' own files), or the held-out side of --data. One
checkpoint gives a row of accuracies, one column per test set, their
unweighted mean (the paper's "average accuracy") and the accuracy pooled over
all questions; several checkpoints give the cross-modality (or question-type)
matrix: trained on the row, tested on the column. A "random guess" row gives
each test set's exact chance accuracy, where one is defined. Tables are
printed as markdown, then written into --output as .md, .csv and (with
matplotlib) a heatmap .png, and every row's numbers as eval_results.json
(model folders are only read).

Every answer is decoded to its end (an end token or --max_new_tokens), as
Med-R1's evaluation does, and scored by each of SCORERS: ours, Med-R1's
released rules and MedEvalKit's; questions without options also by
FREE_SCORES, closed and open apart. A checkpoint trained by train.py says what
it trained on (training_data.json), and the tables count the test images and
questions it saw.
"""

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

import common
import data
import inputs
import lora
import model as modellib
import rewards
import sampler
import sources
import tiny
from common import print0

# Every answer is scored by each of these rewards.REWARDS, 0 or 1:
SCORERS = [
    "accuracy",  # ours, the training reward's: the last <answer> tag, read tolerantly
    "accuracy_medr1_think",  # Med-R1's evaluation of think prompts: the first one-word tag
    "accuracy_medr1_raw",  # Med-R1's evaluation of no-think and zero-shot: the output is the letter
    "accuracy_medr1_reward",  # Med-R1's training reward: the first one-line tag, or the output
    "accuracy_medevalkit",  # MedEvalKit's (Lingshu's tables): yes/no substrings, difflib options
]
# Questions without options are also scored as the medical VQA papers report them: closed ones
# by accuracy, open ones by exact match and token recall and F1 (rewards.py states the
# normalisation), each averaged over the questions of its answer type only.
# summary key -> (answer type, rewards.REWARDS name)
FREE_SCORES = {"closed_accuracy": ("closed", "closed_accuracy"),
               "open_exact_match": ("open", "exact_match"),
               "open_token_recall": ("open", "token_recall"),
               "open_token_f1": ("open", "token_f1")}
POOLED = "pooled"  # the key of a row's summary over every question


@torch.no_grad()
def evaluate(model, processor, samples: list[dict], mode: str, device, batch_size: int = 64,
             max_new_tokens: int = 64, image_size: int | None = None,
             decoder: str = "dynamic") -> list[dict]:
    """Greedy answers to samples, sharded over ranks; every rank gets every result, in order.

    Every rank runs the same number of batches, so FSDP's collectives stay in
    step. Answers are never cut at an early </answer>: the reward reads the
    last tag, so text after the first one can change the answer.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(samples), world))  # (about len / world,) sample indices
    n_batches = math.ceil(math.ceil(len(samples) / world) / batch_size)
    greedy = sampler.decoding_for(model, processor.tokenizer, max_new_tokens, temperature=0.0)
    results = []
    for b in range(n_batches):
        indices = mine[b * batch_size:(b + 1) * batch_size]
        # A rank with nothing left still steps the model once per batch, on a sample it ignores.
        batch = [samples[i] for i in indices or [0]]
        prompts = data.collate(batch, processor, mode, image_size).to(device)
        rollout = sampler.sample(model, prompts, 1, greedy, decoder=decoder)
        texts = sampler.decode(processor.tokenizer, rollout)
        names = SCORERS + sorted({name for _, name in FREE_SCORES.values()})
        for i, text, scores in zip(indices, texts, rewards.score(texts, batch, names, mode)):
            sample = samples[i]
            think = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
            # What the answer says: the option letter chosen, or the free text (None: none).
            answer = (rewards.extract_choice(text, sample["options"]) if sample["options"] else
                      rewards.answer_text(text) or None)
            results.append({"index": i, "id": sample["id"], "completion": text,
                            "answer_type": sample["answer_type"], "answer": answer,
                            "rationale_chars": len(think.group(1)) if think else 0,
                            **dict(zip(names, scores))})
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    return sorted((r for part in everyone for r in part), key=lambda r: r["index"])


def summarize(results: list[dict]) -> dict:
    """Each scorer's accuracy, the parse-failure rate and the mean rationale length of results;
    the closed and open scores over those questions alone (None where there are none)."""
    n = max(len(results), 1)
    summary = {
        **{name: sum(r[name] for r in results) / n for name in SCORERS},
        "parse_failures": sum(r["answer"] is None for r in results) / n,
        "rationale_chars": sum(r["rationale_chars"] for r in results) / n,
        "questions": len(results),
    }
    for kind in ("closed", "open"):
        summary[f"{kind}_questions"] = sum(r["answer_type"] == kind for r in results)
    for key, (kind, name) in FREE_SCORES.items():
        scores = [r[name] for r in results if r["answer_type"] == kind]
        summary[key] = sum(scores) / len(scores) if scores else None
    return summary


def held_out_accuracy(step: int, model, processor, samples: list[dict], mode: str, device,
                      max_new_tokens: int, image_size: int, decoder: str) -> float:
    """Greedy accuracy on held-out samples during training, printed with the step."""
    summary = summarize(evaluate(model, processor, samples, mode, device,
                                 max_new_tokens=max_new_tokens, image_size=image_size,
                                 decoder=decoder))
    print0(f"step {step}: held-out accuracy {summary['accuracy']:.3f} ({summary['questions']} "
           f"questions, parse failures {summary['parse_failures']:.3f})")
    return summary["accuracy"]


def percent(summary: dict, key: str) -> float:
    """summary[key] in percent; nan where it is not defined (None: no question of its kind)."""
    value = summary.get(key)
    return math.nan if value is None else value * 100


def matrix(rows: dict, columns: list[str], key: str) -> dict[str, list[float]]:
    """rows: name -> {column or POOLED: summary} -> name -> summary[key] in percent for each
    column, then their average, then the pooled value; nan where not defined.

    "average" is the unweighted mean over the columns (the paper's average
    accuracy) that have questions the key scores (closed_accuracy: those with
    closed questions); a row without a value in one of them has none.
    "pooled" is over every question, so big test sets weigh more.
    """
    counted = [c for c in columns if any(not math.isnan(percent(by_column[c], key))
                                         for by_column in rows.values())]
    table = {}
    for name, by_column in rows.items():
        values = [percent(by_column[c], key) for c in columns]
        average = (sum(percent(by_column[c], key) for c in counted) / len(counted) if counted
                   else math.nan)
        table[name] = values + [average, percent(by_column[POOLED], key)]
    return table


def cell(value: float) -> str:
    """A percentage with two decimals, or "n/a"."""
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def matrix_markdown(rows: dict, columns: list[str], key: str) -> str:
    """A markdown table of matrix(rows, columns, key)."""
    lines = ["| trained on \\ tested on | " + " | ".join(columns) + " | average | pooled |",
             "|---" * (len(columns) + 3) + "|"]
    for name, values in matrix(rows, columns, key).items():
        lines.append(f"| {name} | " + " | ".join(map(cell, values)) + " |")
    return "\n".join(lines)


def write_tables(rows: dict, columns: list[str], keys: list[str], folder: Path) -> None:
    """The matrices of keys as .md, ours as .csv and a heatmap .png (when matplotlib is there)."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown = "\n\n".join(f"### {key}\n\n" + matrix_markdown(rows, columns, key) for key in keys)
    (folder / "accuracy.md").write_text(markdown + "\n")
    with open(folder / "accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trained_on", *columns, "average", "pooled"])
        for name, values in matrix(rows, columns, "accuracy").items():
            writer.writerow([name, *[cell(v).replace("n/a", "") for v in values]])
    plt = common.pyplot("accuracy.png")
    if plt is None:
        return
    values = [row[:len(columns)] for row in matrix(rows, columns, "accuracy").values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.6 * len(rows) + 2))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, cell(value), ha="center", va="center",
                    color="white" if value < 60 else "black")
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    fig.colorbar(image, label="accuracy %")
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=120)


@dataclass
class EvalConfig:
    """Greedy accuracy of checkpoints on test sets, one column per test set."""

    checkpoints: str = "runs/tiny/final"  # comma-separated model or LoRA folders: one row each
    split_files: str = ""  # test sets, one column each: [name=]file[+file...],...; empty = --data's
    data: str = ""  # OmniMedVQA root (Med-R1 split files' images too); empty = the synthetic data
    cache_dir: str = ".cache"  # the synthetic dataset; images from parquet files go to images/
    modalities: str = ""  # comma-separated Med-R1 modality names; empty = all
    question_types: str = ""  # comma-separated; empty = all (synthetic data: Modality Recognition)
    columns: Literal["modality", "question_type"] = "modality"  # one column per (no split files)
    prompt_mode: Literal[("", *rewards.MODES)] = ""  # empty = the checkpoint's own
    image_size: int = 384  # images are resized to this square first (Med-R1: 384); 0 = keep
    max_pixels: int = 0  # pixel budget per image; 0 = the processor's own (Med-R1: 401408)
    batch_size: int = 64  # prompts per greedy batch on each rank
    max_new_tokens: int = 256  # greedy decoding stops at an end token or here (Med-R1: 256)
    decoder: Literal[sampler.DECODERS] = "dynamic"  # static: fixed-shape cache; graph: compiled
    max_samples: int = 0  # evaluate on the first N questions of each test set; 0 = all
    output: str = "runs/eval"  # folder for accuracy.md/.csv/.png and eval_results.json
    skip_bad_records: bool = False  # skip (and count) bad records instead of stopping


LIMITS = {
    "modalities": common.names_in(sources.MODALITIES),
    "question_types": common.names_in(sources.QUESTION_TYPES),
    "image_size": common.AT_LEAST_0,
    "max_pixels": common.AT_LEAST_0, "batch_size": common.AT_LEAST_1,
    "max_new_tokens": common.AT_LEAST_1, "max_samples": common.AT_LEAST_0,
}


def resolve(cfg: EvalConfig) -> EvalConfig:
    """Every flag checked up front, and every checkpoint found, before any model is evaluated."""
    common.check_flags(cfg, LIMITS)
    for checkpoint in cfg.checkpoints.split(","):
        if not any((Path(checkpoint) / f).exists() for f in ("config.json", "adapter_config.json")):
            raise SystemExit(f"--checkpoints: {checkpoint!r} is not a model or adapter folder "
                             "(no config.json or adapter_config.json)")
        base = lora.base_of(checkpoint)
        if base and not (Path(base) / "config.json").exists():
            raise SystemExit(f"--checkpoints: the adapter {checkpoint!r} is on the base model "
                             f"{base!r}, which holds no config.json: name the base's folder in "
                             "its adapter_config.json (base_model_name_or_path)")
    return cfg


def test_sets(cfg: EvalConfig, root: str) -> dict[str, list[dict]]:
    """Column -> samples: one per test set, or the held-out side by modality or question type."""
    sets = {}
    if cfg.split_files:
        errors = [] if cfg.skip_bad_records else None
        for column, files in data.read_spec(cfg.split_files).items():
            samples = data.load_set(files, root, cfg.cache_dir, errors)
            sets[column] = data.check_images(samples, errors)
        if errors:
            print0(f"skipped {len(errors)} bad records; the first: {errors[0]}")
    else:
        modalities, question_types = tiny.filters(cfg.data, cfg.modalities, cfg.question_types)
        _, held_out = data.load_splits(root, modalities, question_types,
                                       skip_bad_records=cfg.skip_bad_records, log=print0)
        for sample in held_out:
            column = sample["modality"] if cfg.columns == "modality" else sample["question_type"]
            sets.setdefault(column, []).append(sample)
    # Test sets in the order given; the held-out side's columns in alphabetical order.
    order = sets.items() if cfg.split_files else sorted(sets.items())
    return {name: samples[:cfg.max_samples or None] for name, samples in order}


def row_name(checkpoint: Path) -> str:
    """What a checkpoint was trained on, from its train_config.json, else its folder name."""
    config_file = checkpoint / "train_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        return config.get("modalities") or config.get("question_types") or checkpoint.parent.name
    return checkpoint.name


def seen_in_training(checkpoint: Path, samples: list[dict], root: str) -> dict:
    """The share of samples' images, and of samples themselves, that the checkpoint trained on."""
    record_file = checkpoint / "training_data.json"
    if not record_file.exists():
        return {}
    seen = data.seen_in_training(json.loads(record_file.read_text()), samples, root)
    return {"seen_images": seen["seen_images"] / max(seen["test_images"], 1),
            "trained_questions": seen["seen_questions"] / max(len(samples), 1)}


def scorers_markdown(rows: dict, columns: list[str]) -> str:
    """One line per row: each scorer's average over the columns (as in matrix), parse failures
    and the mean rationale length."""
    keys = [*SCORERS, "parse_failures"]
    averages = {key: matrix(rows, columns, key) for key in keys}
    lines = ["| row | " + " | ".join(keys) + " | rationale chars |", "|---" * (len(keys) + 2) + "|"]
    for name, by_column in rows.items():
        rationale = sum(by_column[c]["rationale_chars"] for c in columns) / len(columns)
        cells = [cell(averages[key][name][len(columns)]) for key in keys] + [f"{rationale:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def random_guess_accuracy(samples: list[dict]) -> float | None:
    """The expected accuracy of picking one option (or yes or no) uniformly at random, averaged
    over samples; None where a question has no such set of answers (open, or closed but not
    yes/no)."""
    chances = [1 / len(s["options"]) if s["options"] else
               0.5 if s["answer_type"] == "closed" and rewards.is_yes_no(s["answer"]) else None
               for s in samples]
    return None if None in chances else sum(chances) / len(chances)


def chance(samples: list[dict]) -> dict:
    """The random-guess row's summary: picking an option (or yes or no) uniformly at random has
    an exact expected accuracy, the same for every scorer; None where it is not defined."""
    closed = [s for s in samples if s["answer_type"] == "closed"]
    return {**dict.fromkeys(SCORERS, random_guess_accuracy(samples)),
            "parse_failures": 0.0, "rationale_chars": 0.0,
            **dict.fromkeys(FREE_SCORES), "closed_accuracy":
            random_guess_accuracy(closed) if closed else None}


def evaluate_checkpoint(cfg: EvalConfig, checkpoint: Path, sets: dict, root: str, device) -> dict:
    """One row of the tables: column (and POOLED, with the prompt mode) -> summary."""
    trained = checkpoint / "train_config.json"
    mode = cfg.prompt_mode or (json.loads(trained.read_text())["prompt_mode"] if trained.exists()
                               else "think-after")
    processor = inputs.Processor.from_pretrained(checkpoint, max_pixels=cfg.max_pixels)
    everything = [s for samples in sets.values() for s in samples]
    tokens = data.check_prompts(everything, processor, mode, cfg.image_size, cfg.max_pixels,
                                modellib.max_positions(checkpoint), cfg.max_new_tokens)
    print0(f"{checkpoint}: prompt mode {mode}, {tokens} visual tokens per image")
    model = modellib.load_model(checkpoint).to(device)
    modellib.shard(model, bf16=device.type == "cuda")
    results = evaluate(model, processor, everything, mode, device, cfg.batch_size,
                       cfg.max_new_tokens, cfg.image_size, cfg.decoder)
    by_column, start = {}, 0
    for column, samples in sets.items():
        by_column[column] = {**summarize(results[start:start + len(samples)]),
                             **seen_in_training(checkpoint, samples, root)}
        start += len(samples)
    by_column[POOLED] = {**summarize(results), **seen_in_training(checkpoint, everything, root)}
    if by_column[POOLED].get("trained_questions"):
        print0(f"warning: {checkpoint} was trained on {by_column[POOLED]['trained_questions']:.1%} "
               "of these test questions: its accuracy here is not a held-out accuracy")
    by_column[POOLED]["prompt_mode"] = mode
    return by_column


def main():
    cfg = resolve(common.parse_args(EvalConfig))
    device = common.setup_distributed()
    root = tiny.dataset_root(cfg.data, cfg.cache_dir)
    sets = test_sets(cfg, root)
    columns = list(sets)
    everything = [s for samples in sets.values() for s in samples]
    rows = {"random guess": {column: chance(samples)
                             for column, samples in [*sets.items(), (POOLED, everything)]}}
    checkpoints = {}
    for checkpoint in map(Path, cfg.checkpoints.split(",")):
        name = row_name(checkpoint)
        # Two checkpoints trained on the same thing keep a row each.
        while name in rows:
            name += "'"
        rows[name] = evaluate_checkpoint(cfg, checkpoint, sets, root, device)
        checkpoints[name] = str(checkpoint)
    if dist.get_rank() == 0:
        # The share of test images and questions that training saw, where a checkpoint says.
        seen_keys = ["seen_images", "trained_questions"] if any(
            "seen_images" in by_column[POOLED] for by_column in rows.values()) else []
        for name, by_column in rows.items():
            for summary in by_column.values():
                for key in seen_keys:
                    summary.setdefault(key, 0.0 if name == "random guess" else math.nan)
        print("\naccuracy (%), ours; average: the unweighted mean over the test sets, pooled: over "
              "every question\n" + matrix_markdown(rows, columns, "accuracy"))
        print("\nevery scorer (%), the unweighted mean over the test sets\n" +
              scorers_markdown(rows, columns))
        # Closed and open questions apart, as the medical VQA papers report them.
        kinds = {s["answer_type"] for s in everything}
        free_keys = [key for key, (kind, _) in FREE_SCORES.items() if kind in kinds]
        for key in free_keys:
            print(f"\n{key} (%), over each test set's {FREE_SCORES[key][0]} questions only (n/a: "
                  "it has none, or chance is not defined)\n" + matrix_markdown(rows, columns, key))
        for key in seen_keys:
            print(f"\n{key} (%; n/a: the checkpoint does not say what it trained on)\n" +
                  matrix_markdown(rows, columns, key))
        # Written only after the tables are printed, and never into a model folder.
        accuracy = matrix(rows, columns, "accuracy")
        results = {name: {"checkpoint": checkpoints[name], "overall": rows[name][POOLED],
                          "mean_over_test_sets": accuracy[name][len(columns)] / 100,
                          "per_test_set": {c: rows[name][c] for c in columns}}
                   for name in checkpoints}
        try:
            write_tables(rows, columns, [*SCORERS, "parse_failures", *free_keys, *seen_keys],
                         Path(cfg.output))
            (Path(cfg.output) / "eval_results.json").write_text(json.dumps(results, indent=1))
        except OSError as error:
            raise SystemExit(f"cannot write to --output {cfg.output} ({error.strerror}): the "
                             "tables are printed above; pass another --output") from error
    common.finish_distributed()


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad input: the message names the file and record
        raise SystemExit(f"error: {error}")
