"""Step time of this project's GRPO against TRL's GRPOTrainer, side by side in one invocation.

    python bench.py                  # the embedded tiny model on CPU; TRL is optional
    python bench.py --device cuda    # the same on one GPU
    pip install trl==1.16.0          # the benchmark-only extra for the TRL row
    python bench.py --device cuda --dtype bf16 --model qwen2-vl-2b --image_size 384 \
        --prompts 8 --generations 8 --completion_tokens 256 --grad_checkpointing true \
        --decoders dynamic,static,graph --decode_rows 16,64 --steps 3 --warmup 1 --scaling false
                                     # real size: the README's GPU table

Both run the same Qwen2-VL weights on the same prompts and images, with G
completions per prompt forced to the same length (no end token stops them),
beta 0.04, the grpo loss, on one process, our side once per decoder
(model.DECODERS). Each runs in its own child process so peak memory is its own.
--model qwen2-vl-2b is Qwen2-VL-2B-Instruct's architecture at its real size with
random weights and the tiny model's tokenizer (built once into .cache; nothing
is downloaded). --decode_rows adds a table of milliseconds per decoded token
against the least time a token can take: the bytes it must read (the language
model's weights and the KV cache) over the memory bandwidth, measured by a large
copy in the same process. The last table shows how our step time grows with G,
completion length and image size; its "prefill" column is one sample() call that
makes a single token, so it is the cost of encoding the prompts and images,
which should not grow with G.
"""

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

import common
import data
import inputs
import model as modellib
import rewards
import sampler
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
    dtype: str = "fp32"  # fp32, or bf16 (mixed precision, fp32 master weights, on both sides)
    model: str = ""  # a local Qwen2-VL folder; qwen2-vl-2b = its real size, random; empty = tiny
    decoders: str = "dynamic"  # our side: a row for each of these decoders (model.DECODERS)
    decode_rows: str = ""  # e.g. 16,64: time a decoded token at these rows, against its bound
    grad_checkpointing: bool = False  # both sides: recompute decoder layers in the backward pass
    lora_rank: int = 16  # the "ours + LoRA" row: adapters of this rank (0: no such row)
    run: str = ""  # internal: ours, trl or decode, to run one part in a child process
    scaling: bool = True  # also print the table of our step time against G, length and image size


def bench_samples(cfg: BenchConfig, count: int = 0) -> list[dict]:
    """The first count synthetic questions; 0 = enough for every step."""
    root = tiny.dataset_root("", ".cache")
    samples = sources.load_omnimedvqa(root, question_types=[tiny.QUESTION_TYPE])
    return samples[:count or cfg.prompts * (cfg.steps + cfg.warmup)]


def bench_model(cfg: BenchConfig) -> str:
    """--model, the real-size random Qwen2-VL-2B, or the embedded tiny model (built once)."""
    tiny_path = tiny.model_path("", ".cache", tiny.dataset_root("", ".cache"))
    if cfg.model == "qwen2-vl-2b":
        return real_size_model(Path(".cache") / "qwen2-vl-2b-random", tiny_path)
    return cfg.model or tiny_path


# Qwen/Qwen2-VL-2B-Instruct's config.json sizes (2.21 B parameters). Its token ids stay the
# tiny tokenizer's, as does its processor apart from Qwen2-VL's own pixel limits.
QWEN2_VL_2B_SIZES = {
    "text_config": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                    "max_position_embeddings": 32768, "rope_parameters": {
                        "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16,
                      "mlp_ratio": 4},
    "tie_word_embeddings": True,
}
QWEN2_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}


def real_size_model(folder: Path, tiny_path: str) -> str:
    """The tiny model's folder with the Qwen2-VL-2B sizes and random bf16 weights (built once)."""
    if folder.exists():
        return str(folder)
    config = json.loads((Path(tiny_path) / "config.json").read_text())
    for key, sizes in QWEN2_VL_2B_SIZES.items():
        config[key] = {**config[key], **sizes} if isinstance(sizes, dict) else sizes
    del config["text_config"]["layer_types"]  # one per layer: derived again from the new depth
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config),
                                                    dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(tiny_path)
    tmp = tiny.new_build_folder(folder)
    model.save_pretrained(tmp)
    inputs.Processor.from_pretrained(tiny_path, **QWEN2_VL_PIXELS).save_pretrained(tmp)
    tiny.publish(tmp, folder, "config.json")
    return str(folder)


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
                             decoder=cfg.decoders, lora_rank=cfg.lora_rank)
    train.resolve(train_cfg, world=1)
    policy, reference = train.load_models(train_cfg, path, device)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=5e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    # No end token: every completion runs to completion_tokens, as on TRL's side.
    decoding = sampler.Decoding(cfg.completion_tokens)
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
            sampler.sample(policy, prompts, cfg.generations, sampler.Decoding(1),
                           generator=generator, decoder=cfg.decoders)
            synchronize(device)
            prefills.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "prefill_s": statistics.median(prefills)}


def decode_speed(cfg: BenchConfig) -> dict:
    """Milliseconds per decoded token of sample() for each decoder and --decode_rows, and the
    least each could take: the bytes a token reads over the measured memory bandwidth."""
    G, T, row_counts = cfg.generations, cfg.completion_tokens, decode_rows(cfg)
    path, device = bench_model(cfg), torch.device(cfg.device)
    samples, processor = bench_samples(cfg, max(row_counts) // G), bench_processor(cfg, path)
    train_cfg = train.Config(dtype=cfg.dtype, beta=0.0, image_size=cfg.image_size)
    train.resolve(train_cfg, world=1)
    policy, _ = train.load_models(train_cfg, path, device)
    text = policy.config.get_text_config()
    # Every decoded token reads the decoder layers, the final norm and the output head once.
    parts = [policy.model.language_model.layers, policy.model.language_model.norm, policy.lm_head]
    weights = sum(p.numel() for part in parts for p in part.parameters())
    itemsize = 2 if cfg.dtype == "bf16" else 4
    # ... and the keys and values of every earlier position, layer and row.
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_position = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * itemsize
    bandwidth = copy_bandwidth(device)
    rows = []
    for n in row_counts:
        prompts = data.collate(samples[:n // G], processor, "think-after", cfg.image_size)
        prompts = prompts.to(device)
        # The average token of T attends to the prompt and T / 2 completion tokens.
        read = weights * itemsize + kv_per_position * n * (prompts.input_ids.shape[1] + T / 2)
        for decoder in cfg.decoders.split(","):
            def seconds(tokens):
                synchronize(device)
                start = time.perf_counter()
                sampler.sample(policy, prompts, G, sampler.Decoding(tokens),
                               generator=torch.Generator().manual_seed(0), decoder=decoder)
                synchronize(device)
                return time.perf_counter() - start
            seconds(T)  # warm-up: compiles, on the graph decoder
            ms = 1000 * statistics.median((seconds(T) - seconds(1)) / (T - 1) for _ in range(3))
            rows.append({"decoder": decoder, "rows": n, "ms": ms, "gb_read": read / 1e9,
                         "bound_ms": 1000 * read / bandwidth,
                         **logprob_gap(policy, prompts, G, T, decoder)})
    return {"bandwidth_gbs": bandwidth / 1e9, "decode": rows}


def decode_rows(cfg: BenchConfig) -> list[int]:
    """--decode_rows as numbers, each a whole number of groups of G."""
    counts = [int(r) for r in cfg.decode_rows.split(",")]
    if any(n < cfg.generations or n % cfg.generations for n in counts):
        raise SystemExit(f"--decode_rows {cfg.decode_rows}: each must be a multiple of "
                         f"--generations {cfg.generations}")
    return counts


def logprob_gap(policy, prompts, G: int, T: int, decoder: str) -> dict:
    """How far the sampler's log-probs are from a no-grad training forward on the same tokens:
    the largest difference, and the share of tokens whose ratio it alone would clip (eps 0.2)."""
    rollout = sampler.sample(policy, prompts, G, sampler.Decoding(T),
                             generator=torch.Generator().manual_seed(0), decoder=decoder)
    with torch.no_grad():
        forward = modellib.token_logprobs(policy, prompts, rollout.completion_ids,
                                          rollout.completion_mask, group_size=G)  # (N, T)
    gap = rollout.logprobs - forward  # (N, T), every token counts: no end token
    return {"max_gap": gap.abs().max().item(),
            "clipped": ((gap.exp() - 1).abs() > 0.2).float().mean().item()}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second read and written by a copy of 1 GiB on the device."""
    source = torch.ones(2 ** 28, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(device)
    return 10 * 2 * source.nbytes / (time.perf_counter() - start)


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
            synchronize(torch.device(cfg.device))
            times.append(time.perf_counter() - self.start)

    args = GRPOConfig(
        output_dir="runs/bench-trl", per_device_train_batch_size=cfg.prompts * cfg.generations,
        num_generations=cfg.generations, max_completion_length=cfg.completion_tokens,
        generation_kwargs={"min_new_tokens": cfg.completion_tokens}, beta=0.04, loss_type="grpo",
        temperature=1.0, learning_rate=5e-4, use_cpu=cfg.device == "cpu", bf16=cfg.dtype == "bf16",
        gradient_checkpointing=cfg.grad_checkpointing, max_steps=cfg.warmup + cfg.steps,
        shuffle_dataset=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True)
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
        result = {"ours": ours, "trl": trl, "decode": decode_speed}[cfg.run](cfg)
        result["peak_mb"] = (torch.cuda.max_memory_allocated() if cuda else
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
        print("RESULT " + json.dumps(result))
        return
    decoders = cfg.decoders.split(",")
    if not set(decoders) <= set(sampler.DECODERS):
        raise SystemExit(f"--decoders {cfg.decoders}: each must be one of {sampler.DECODERS}")
    if cfg.decode_rows:
        decode_rows(cfg)
    completions = cfg.prompts * cfg.generations
    print(f"{cfg.prompts} prompts x G={cfg.generations}, {cfg.completion_tokens} tokens each, "
          f"{cfg.image_size} px images, {cfg.dtype}, {cfg.device}, "
          f"median of {cfg.steps} steps after {cfg.warmup} warm-up\n")
    rows = {f"ours, {d} decoder": child(cfg, "ours", lora_rank=0, decoders=d) for d in decoders}
    if cfg.lora_rank:
        rows[f"ours, {decoders[0]} decoder, LoRA r={cfg.lora_rank} (no reference copy)"] = \
            child(cfg, "ours", decoders=decoders[0])
    if importlib.util.find_spec("trl"):
        rows["TRL GRPOTrainer"] = child(cfg, "trl")
    else:
        print("TRL is not installed: pip install trl==1.16.0 for the side-by-side row\n")
    memory = "peak GPU memory allocated" if cfg.device == "cuda" else "peak process memory (RSS)"
    print(f"| trainer | s / step | completion tokens / s | {memory}, MB |\n|---|---|---|---|")
    for name, row in rows.items():
        if row:
            tokens_per_s = completions * cfg.completion_tokens / row["step_s"]
            print(f"| {name} | {row['step_s']:.3f} | {tokens_per_s:.0f} | {row['peak_mb']:.0f} |")
    if rows.get("TRL GRPOTrainer"):
        print()
        for decoder in decoders:
            if ours_row := rows[f"ours, {decoder} decoder"]:
                ratio = ours_row["step_s"] / rows["TRL GRPOTrainer"]["step_s"]
                print(f"ours ({decoder} decoder) / TRL step time: {ratio:.2f} (goal: 0.3 or less)")
    if cfg.decode_rows and (speed := child(cfg, "decode")):
        print(f"\nmemory bandwidth: {speed['bandwidth_gbs']:.0f} GB/s (a 1 GiB copy, read and "
              f"written); the bound is the bytes a token reads over it\n\n"
              "| decoder | rows | ms / token | bound, ms | x bound (goal: 3 or less) "
              "| GB read / token | GB/s used | sampler vs training log-prob, max gap "
              "| tokens clipped by the gap alone |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for row in speed["decode"]:
            print(f"| {row['decoder']} | {row['rows']} | {row['ms']:.2f} | {row['bound_ms']:.2f} | "
                  f"{row['ms'] / row['bound_ms']:.1f} | {row['gb_read']:.2f} | "
                  f"{row['gb_read'] / row['ms'] * 1000:.0f} | {row['max_gap']:.2g} | "
                  f"{100 * row['clipped']:.2f}% |")
    if not cfg.scaling:
        return
    print("\nour step time as one setting changes (the others as above):\n\n"
          "| setting | s / step | prefill s |\n|---|---|---|")
    for name, values in [("generations", [2, 4, 8, 16]), ("completion_tokens", [16, 64, 256]),
                         ("image_size", [56, 224, 448])]:
        for value in values:
            row = child(cfg, "ours", lora_rank=0, decoders=decoders[0], **{name: value})
            if row:
                print(f"| {name} = {value} | {row['step_s']:.3f} | {row['prefill_s']:.3f} |")


if __name__ == "__main__":
    main()
