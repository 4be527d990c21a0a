"""Greedy evaluation: accuracy per modality and overall, and the parse-failure rate.

    python eval.py --checkpoint runs/tiny/final
    torchrun --nproc_per_node 2 eval.py --checkpoint runs/tiny/final

With no --data it evaluates on the held-out side of the synthetic dataset the
tiny default trains on. Results are printed as a table and written as JSON
beside the checkpoint. Reuses the sampler (model.sample) and the extractor
(rewards.extract_choice); nothing here is a copy of them.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import model as modellib
import rewards
import train


@torch.no_grad()
def evaluate(model, processor, samples: list[dict], mode: str, device, batch_size: int = 64,
             max_new_tokens: int = 64, image_size: int | None = None) -> dict:
    """Greedy accuracy over samples, sharded over ranks; every rank gets the same result dict.

    Every rank runs the same number of batches, so FSDP's collectives stay in step.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(samples), world))  # (about len / world,) sample indices
    n_batches = math.ceil(math.ceil(len(samples) / world) / batch_size)
    end_ids = modellib.end_token_ids(model, processor.tokenizer)
    banned = processor.tokenizer.convert_tokens_to_ids(modellib.VISION_TOKENS)
    results = []
    for b in range(n_batches):
        indices = mine[b * batch_size:(b + 1) * batch_size]
        # A rank with nothing left still steps the model once per batch, on a sample it then ignores.
        prompts = data.collate([samples[i] for i in indices or [0]], processor, mode, image_size).to(device)
        rollout = modellib.sample(model, prompts, 1, max_new_tokens, end_ids, banned, temperature=0.0)
        for i, text in zip(indices, modellib.decode(processor.tokenizer, rollout)):
            choice = rewards.extract_choice(text, samples[i]["options"])
            results.append({"id": samples[i]["id"], "modality": samples[i]["modality"],
                            "choice": choice, "correct": choice == samples[i]["answer"]})
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    return summarize([r for part in everyone for r in part])


def summarize(results: list[dict]) -> dict:
    """Accuracy per modality and overall (pooled over questions), and the parse-failure rate."""
    by_modality = {}
    for r in results:
        by_modality.setdefault(r["modality"], []).append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in results) / max(len(results), 1),
        "parse_failures": sum(r["choice"] is None for r in results) / max(len(results), 1),
        "questions": len(results),
        "per_modality": {m: sum(c) / len(c) for m, c in sorted(by_modality.items())},
    }


def table(summary: dict) -> str:
    """A markdown table of one evaluation."""
    rows = [f"| {m} | {acc * 100:.1f} |" for m, acc in summary["per_modality"].items()]
    return "\n".join(["| modality | accuracy % |", "|---|---|", *rows,
                      f"| **overall** ({summary['questions']} questions) | **{summary['accuracy'] * 100:.1f}** |",
                      f"\nanswers that could not be parsed: {summary['parse_failures'] * 100:.1f}%"])


@dataclass
class EvalConfig:
    checkpoint: str = "runs/tiny/final"  # a Hugging Face folder saved by train.py (or a base model folder)
    data: str = ""  # OmniMedVQA root; empty = the synthetic dataset in cache_dir
    cache_dir: str = ".cache"  # where the synthetic dataset lives
    modalities: str = ""  # comma-separated Med-R1 modality names; empty = all
    question_types: str = ""  # comma-separated; empty = all (Modality Recognition for the synthetic data)
    prompt_mode: str = "think-after"  # think-after, think-before or no-think: use the training one
    image_size: int = 384  # images are resized to this square first (Med-R1: 384); 0 = keep size
    batch_size: int = 64  # prompts per greedy batch on each rank
    max_new_tokens: int = 64  # greedy decoding stops here or at an end token
    max_samples: int = 0  # evaluate on the first N test questions; 0 = all


def main():
    cfg = train.parse_args(EvalConfig)
    device = train.setup_distributed()
    samples = train.load_split(cfg, train.dataset_root(cfg), "test")[:cfg.max_samples or None]
    processor = modellib.Processor.from_pretrained(cfg.checkpoint)
    model = modellib.load_model(cfg.checkpoint).to(device)
    modellib.shard(model, bf16=device.type == "cuda")
    summary = evaluate(model, processor, samples, cfg.prompt_mode, device, cfg.batch_size, cfg.max_new_tokens,
                       cfg.image_size or None)
    if dist.get_rank() == 0:
        print(table(summary))
        (Path(cfg.checkpoint) / "eval_results.json").write_text(json.dumps(summary, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
