"""Step time of this project's GRPO against TRL's GRPOTrainer, side by side in one invocation.

    python bench.py                  # the embedded tiny model on CPU; TRL is optional
    python bench.py --device cuda    # the same on one GPU
    pip install trl==1.16.0          # the benchmark-only extra for the TRL row

Both run the same tiny Qwen2-VL weights on the same prompts and images, with G
completions per prompt forced to the same length (no end token stops them),
beta 0.04, the grpo loss, fp32 and no gradient checkpointing, on one process.
Each runs in its own child process so peak memory is its own. The second table
shows how our step time grows with G, completion length and image size; its
"prefill" column is one sample() call that makes a single token, so it is the
cost of encoding the prompts and images, which should not grow with G.
"""

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import common
import data
import inputs
import model as modellib
import rewards
import sources
import tiny
import train


@dataclass
class BenchConfig:
    """Our GRPO step against TRL's GRPOTrainer, side by side; every flag is a field here."""

    steps: int = 10  # timed steps, after the warm-up
    warmup: int = 2  # untimed steps first
    prompts: int = 8  # prompts per step
    generations: int = 8  # G
    completion_tokens: int = 32  # every completion has exactly this many tokens
    image_size: int = 56  # images are resized to this square
    device: str = "cpu"  # cpu or cuda (one GPU)
    dtype: str = "fp32"  # fp32, or bf16 for our side only (TRL's row is skipped then)
    model: str = ""  # a local Qwen2-VL folder; empty = the embedded tiny model
    compile_decode: bool = False  # our side: torch.compile the decode step
    grad_checkpointing: bool = False  # our side: recompute decoder layers in the backward pass
    lora_rank: int = 16  # the "ours + LoRA" row: adapters of this rank (0: no such row)
    run: str = ""  # internal: ours or trl, to run one side in a child process
    scaling: bool = True  # also print the table of our step time against G, length and image size


def bench_samples(cfg: BenchConfig) -> list[dict]:
    root = tiny.dataset_root("", ".cache")
    samples = sources.load_omnimedvqa(root, question_types=[tiny.QUESTION_TYPE])
    return samples[:cfg.prompts * (cfg.steps + cfg.warmup)]


def bench_model(cfg: BenchConfig) -> str:
    """--model, or the embedded tiny model (built on first use)."""
    return tiny.model_path(cfg.model, ".cache", tiny.dataset_root("", ".cache"))


def bench_processor(cfg: BenchConfig, path: str) -> inputs.Processor:
    """The model's processor; the tiny one's budget (64 x 64 pixels) grows to fit --image_size."""
    max_pixels = None if cfg.model else max(cfg.image_size, 64) ** 2
    return inputs.Processor.from_pretrained(path, max_pixels=max_pixels)


def ours(cfg: BenchConfig) -> dict:
    """Median seconds per GRPO step of this project (train.grpo_iteration, FSDP2 on one process)."""
    path, samples, device = bench_model(cfg), bench_samples(cfg), torch.device(cfg.device)
    processor = bench_processor(cfg, path)
    train_cfg = train.Config(num_generations=cfg.generations, prompts_per_step=cfg.prompts, lr=5e-4,
                             max_new_tokens=cfg.completion_tokens, dtype=cfg.dtype,
                             image_size=cfg.image_size, grad_checkpointing=cfg.grad_checkpointing,
                             compile_decode=cfg.compile_decode, lora_rank=cfg.lora_rank)
    train.resolve(train_cfg, world=1)
    policy, reference = train.load_models(train_cfg, path, device)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=5e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    # No end token: every completion runs to completion_tokens, as on TRL's side.
    decoding = modellib.Decoding(cfg.completion_tokens)
    generator = torch.Generator().manual_seed(0)
    times, prefills = [], []
    for step in range(cfg.warmup + cfg.steps):
        batch = samples[step * cfg.prompts:(step + 1) * cfg.prompts]
        start = time.perf_counter()
        train.grpo_iteration(train_cfg, policy, reference, optimizer, schedule, processor, batch,
                             decoding, generator)
        synchronize(device)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - start)
            prompts = data.collate(batch, processor, "think-after", cfg.image_size).to(device)
            start = time.perf_counter()
            modellib.sample(policy, prompts, cfg.generations, modellib.Decoding(1),
                            generator=generator)
            synchronize(device)
            prefills.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "prefill_s": statistics.median(prefills)}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times count it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trl(cfg: BenchConfig) -> dict:
    """Median seconds per step of TRL's GRPOTrainer: the same model, prompts, images, settings."""
    from datasets import Dataset
    from transformers import Qwen2VLProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video half (which needs torchvision), for TRL's API."""

        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    path, samples = bench_model(cfg), bench_samples(cfg)
    ours_processor = bench_processor(cfg, path)
    processor = ImageOnlyProcessor(image_processor=ours_processor.image_processor,
                                   tokenizer=ours_processor.tokenizer, video_processor=None,
                                   chat_template=ours_processor.tokenizer.chat_template)
    dataset = Dataset.from_list([{
        "prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": data.build_prompt(s, "think-after")}]}],
        "image": inputs.load_image(s["images"][0], cfg.image_size), "sample": json.dumps(s)}
        for s in samples])

    def reward(name):
        def score(prompts, completions, sample, **kwargs):
            texts, samples = [c[0]["content"] for c in completions], [json.loads(s) for s in sample]
            return [row[0] for row in rewards.score(texts, samples, [name], "think-after")]
        score.__name__ = name
        return score

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = GRPOConfig(
        output_dir="runs/bench-trl", per_device_train_batch_size=cfg.prompts * cfg.generations,
        num_generations=cfg.generations, max_completion_length=cfg.completion_tokens,
        generation_kwargs={"min_new_tokens": cfg.completion_tokens}, beta=0.04, loss_type="grpo",
        temperature=1.0, learning_rate=5e-4, use_cpu=cfg.device == "cpu", bf16=False,
        gradient_checkpointing=False, max_steps=cfg.warmup + cfg.steps, shuffle_dataset=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = GRPOTrainer(model=modellib.load_model(path),
                          reward_funcs=[reward("format"), reward("accuracy")], args=args,
                          train_dataset=dataset, processing_class=processor,
                          callbacks=[StepTimer()])
    trainer.train()
    return {"step_s": statistics.median(times[cfg.warmup:])}


def child(cfg: BenchConfig, run: str, **changes) -> dict | None:
    """Run one side in a fresh process; its result and its own peak memory, or None if it failed."""
    settings = {**asdict(cfg), **changes, "run": run, "scaling": False}
    flags = [f"--{k}={v}" for k, v in settings.items()]
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(f"{run} failed:\n" + done.stderr[-2000:])
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def main():
    cfg = common.parse_args(BenchConfig)
    if cfg.run:
        cuda = cfg.device == "cuda"
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        result = ours(cfg) if cfg.run == "ours" else trl(cfg)
        result["peak_mb"] = (torch.cuda.max_memory_allocated() if cuda else
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
        print("RESULT " + json.dumps(result))
        return
    completions = cfg.prompts * cfg.generations
    print(f"{cfg.prompts} prompts x G={cfg.generations}, {cfg.completion_tokens} tokens each, "
          f"{cfg.image_size} px images, {cfg.dtype}, {cfg.device}, "
          f"median of {cfg.steps} steps after {cfg.warmup} warm-up\n")
    rows = {"ours": child(cfg, "ours", lora_rank=0)}
    if cfg.lora_rank:
        rows[f"ours + LoRA r={cfg.lora_rank} (no reference copy)"] = child(cfg, "ours")
    if cfg.dtype != "fp32" or cfg.model:
        print("TRL's row runs only on the tiny model in fp32\n")
    elif importlib.util.find_spec("trl"):
        rows["TRL GRPOTrainer"] = child(cfg, "trl")
    else:
        print("TRL is not installed: pip install trl==1.16.0 for the side-by-side row\n")
    memory = "peak GPU memory allocated" if cfg.device == "cuda" else "peak process memory (RSS)"
    print(f"| trainer | s / step | completion tokens / s | {memory}, MB |\n|---|---|---|---|")
    for name, row in rows.items():
        if row:
            tokens_per_s = completions * cfg.completion_tokens / row["step_s"]
            print(f"| {name} | {row['step_s']:.3f} | {tokens_per_s:.0f} | {row['peak_mb']:.0f} |")
    if rows.get("TRL GRPOTrainer") and rows["ours"]:
        ratio = rows["ours"]["step_s"] / rows["TRL GRPOTrainer"]["step_s"]
        print(f"\nours / TRL step time: {ratio:.2f}")
    if not cfg.scaling:
        return
    print("\nour step time as one setting changes (the others as above):\n\n"
          "| setting | s / step | prefill s |\n|---|---|---|")
    for name, values in [("generations", [2, 4, 8, 16]), ("completion_tokens", [16, 64, 256]),
                         ("image_size", [56, 224, 448])]:
        for value in values:
            row = child(cfg, "ours", lora_rank=0, **{name: value})
            if row:
                print(f"| {name} = {value} | {row['step_s']:.3f} | {row['prefill_s']:.3f} |")


if __name__ == "__main__":
    main()
