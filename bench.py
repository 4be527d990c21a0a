"""Our GRPO step against TRL's GRPOTrainer, and how fast we decode, side by side in one run.

    python bench.py                  # the tiny model on CPU: step, LoRA, TRL's step, scaling
    pip install trl==1.16.0          # the benchmark-only extra for TRL's row
    ./bench_gpu.sh                   # on a lent GPU at real sizes: its flags, and the README

Both sides run the same Qwen2-VL weights on the same prompts and images, G completions per
prompt forced to the same length (no end token), beta 0.04, the grpo loss, on one process, each
part in a child process of its own (so peak memory is its own). --model qwen2-vl-2b or
qwen2.5-vl-3b is that model at its real size with random weights and the tiny tokenizer, built
once into .cache. The stages (STAGES): cuda_tests (test_decoders.py's CUDA tests); decode (ms
per decoded token at --decode_rows against the least it can take, the bytes a token reads over
the bandwidth of a large copy; the graph decoder's compile time apart); step (per decoder);
trl; lora; logprob_gap (the sampler's log-probs against a no-grad training forward); scaling
(our step time against G, length and image size). Each result is printed, flushed and appended
to --json the moment it is measured; the tables come last. A stage that would not fit in what
is left of --budget_s is skipped, one still running when it runs out is stopped, both said.
"""

import collections
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
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
    model: str = ""  # a local Qwen2-VL folder; qwen2-vl-2b or qwen2.5-vl-3b: random; empty = tiny
    lora_model: str = ""  # the lora stage's model (as --model); empty = --model
    decoders: str = "dynamic"  # our side: a row for each of these decoders (sampler.DECODERS)
    decode_rows: str = "16,64"  # the decode stage times a decoded token at these rows
    grad_checkpointing: bool = False  # both sides: recompute decoder layers in the backward pass
    lora_rank: int = 16  # the lora stage's adapters have this rank
    stages: str = "step,lora,trl,scaling"  # some of STAGES, run in this order
    budget_s: float = 0.0  # skip or stop what would not fit in this many seconds; 0 = no limit
    json: str = ""  # append each result to this file as it comes, one JSON object a line
    run: str = ""  # internal: a RUNS key, to run one part in a child process


def bench_samples(cfg: BenchConfig, count: int = 0) -> list[dict]:
    """The first count synthetic questions; 0 = enough for every step."""
    root = tiny.dataset_root("", ".cache")
    samples = sources.load_omnimedvqa(root, question_types=[tiny.QUESTION_TYPE])
    return samples[:count or cfg.prompts * (cfg.steps + cfg.warmup)]


def bench_model(cfg: BenchConfig) -> str:
    """--model, a real-size random model (REAL_SIZES), or the embedded tiny model (built once)."""
    tiny_path = tiny.model_path("", ".cache", tiny.dataset_root("", ".cache"))
    if cfg.model in REAL_SIZES:
        return real_size_model(cfg.model, tiny_path, torch.device(cfg.device))
    return cfg.model or tiny_path


# The sizes in Qwen/Qwen2-VL-2B-Instruct's config.json (2.21 B parameters) and Qwen2.5-VL-3B's
# (3.75 B; tests/families.py holds its file), over the tiny model's config: token ids and
# processor stay the tiny model's, but for Qwen2-VL's pixel limits (Qwen2.5-VL's are the same).
ROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
REAL_SIZES = {
    "qwen2-vl-2b": {"tie_word_embeddings": True, "text_config": {
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_parameters": ROPE}, "vision_config": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}},
    "qwen2.5-vl-3b": {"tie_word_embeddings": True, "model_type": "qwen2_5_vl", "text_config": {
        "model_type": "qwen2_5_vl_text", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
        "num_key_value_heads": 2, "max_position_embeddings": 128000, "rope_parameters": ROPE},
        "vision_config": {"model_type": "qwen2_5_vl_vision", "depth": 32, "hidden_act": "silu",
        "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
        "window_size": 112, "tokens_per_second": 2, "fullatt_block_indexes": [7, 15, 23, 31]}},
}
QWEN2_VL_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}


def real_size_model(name: str, tiny_path: str, device: torch.device) -> str:
    """The tiny model's folder with REAL_SIZES[name] and random bf16 weights, drawn on the device
    (seconds on a GPU) and saved once into .cache."""
    folder = Path(".cache") / f"{name}-random"
    if folder.exists():
        return str(folder)
    config = json.loads((Path(tiny_path) / "config.json").read_text())
    for key, sizes in REAL_SIZES[name].items():
        config[key] = {**config[key], **sizes} if isinstance(sizes, dict) else sizes
    del config["text_config"]["layer_types"]  # one per layer: derived again from the new depth
    torch.manual_seed(0)
    with device:
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


def ours(cfg: BenchConfig):
    """Median seconds per GRPO step of this project (train.grpo_iteration, FSDP2 on one process)."""
    path, samples, device = bench_model(cfg), bench_samples(cfg), torch.device(cfg.device)
    processor = bench_processor(cfg, path)
    train_cfg = train.Config(num_generations=cfg.generations, prompts_per_step=cfg.prompts, lr=5e-4,
                             max_new_tokens=cfg.completion_tokens, dtype=cfg.dtype,
                             image_size=cfg.image_size, grad_checkpointing=cfg.grad_checkpointing,
                             decoder=cfg.decoders, lora_rank=cfg.lora_rank)
    train.resolve(train_cfg, world=1)
    policy, reference = modellib.load_models(train_cfg, path, device)
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
        times.append(time.perf_counter() - start)
        if step >= cfg.warmup:
            prompts = data.collate(batch, processor, "think-after", cfg.image_size).to(device)
            start = time.perf_counter()
            sampler.sample(policy, prompts, cfg.generations, sampler.Decoding(1),
                           generator=generator, decoder=cfg.decoders)
            synchronize(device)
            prefills.append(time.perf_counter() - start)
    step_s = statistics.median(times[cfg.warmup:])
    # The first step holds the graph decoder's compile time.
    yield {"model": cfg.model, "decoder": cfg.decoders, "lora_rank": cfg.lora_rank,
           **{name: getattr(cfg, name) for name in SCALING}, "step_s": step_s,
           "first_step_s": times[0], "prefill_s": statistics.median(prefills),
           "tokens_per_s": cfg.prompts * cfg.generations * cfg.completion_tokens / step_s}


def sampling_policy(cfg: BenchConfig) -> tuple:
    """The policy as train.py loads it (FSDP2 on one process), its processor and device."""
    path, device = bench_model(cfg), torch.device(cfg.device)
    train_cfg = train.Config(dtype=cfg.dtype, beta=0.0, image_size=cfg.image_size)
    train.resolve(train_cfg, world=1)
    policy, _ = modellib.load_models(train_cfg, path, device)
    return policy, bench_processor(cfg, path), device


def decode_speed(cfg: BenchConfig):
    """Milliseconds per decoded token of sample() for each decoder and --decode_rows, and the
    least each could take: the bytes a token reads over the measured memory bandwidth."""
    G, T = cfg.generations, cfg.completion_tokens
    row_counts = [int(n) for n in cfg.decode_rows.split(",")]
    policy, processor, device = sampling_policy(cfg)
    samples = bench_samples(cfg, max(row_counts) // G)
    text = policy.config.get_text_config()
    # Every decoded token reads the decoder layers, the final norm and the output head once.
    parts = [policy.model.language_model.layers, policy.model.language_model.norm, policy.lm_head]
    weights = sum(p.numel() for part in parts for p in part.parameters())
    itemsize = 2 if cfg.dtype == "bf16" else 4
    # ... and the keys and values of every earlier position, layer and row.
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_position = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * itemsize
    bandwidth = copy_bandwidth(device)
    yield {"bandwidth_gbs": bandwidth / 1e9}
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
            first, full = seconds(T), seconds(T)  # the first compiles, on the graph decoder
            ms = 1000 * (full - seconds(1)) / (T - 1)
            yield {"decoder": decoder, "rows": n, "ms": ms, "bound_ms": 1000 * read / bandwidth,
                   "gb_read": read / 1e9, **({"compile_s": first - full} if decoder == "graph"
                                             else {})}


def logprob_gaps(cfg: BenchConfig):
    """For each decoder, how far the sampler's log-probs are from a no-grad training forward on
    the same tokens, on one step's prompts: the largest difference, and the share of tokens
    whose ratio it alone would clip (eps 0.2)."""
    policy, processor, device = sampling_policy(cfg)
    prompts = data.collate(bench_samples(cfg, cfg.prompts), processor, "think-after",
                           cfg.image_size).to(device)
    G, T = cfg.generations, cfg.completion_tokens
    for decoder in cfg.decoders.split(","):
        rollout = sampler.sample(policy, prompts, G, sampler.Decoding(T),
                                 generator=torch.Generator().manual_seed(0), decoder=decoder)
        with torch.no_grad():
            forward = modellib.token_logprobs(policy, prompts, rollout.completion_ids,
                                              rollout.completion_mask, group_size=G)  # (N, T)
        gap = rollout.logprobs - forward  # (N, T), every token counts: no end token
        yield {"decoder": decoder, "rows": G * cfg.prompts, "dtype": cfg.dtype,
               "max_gap": gap.abs().max().item(),
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


def trl(cfg: BenchConfig):
    """Median seconds per step of TRL's GRPOTrainer: the same model, prompts, images, settings."""
    try:
        from trl import GRPOConfig, GRPOTrainer
        from datasets import Dataset
    except ImportError as error:
        yield {"skipped": f"TRL cannot be imported ({error}): pip install trl==1.16.0"}
        return
    from transformers import Qwen2VLProcessor, TrainerCallback

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
    step_s = statistics.median(times[cfg.warmup:])
    yield {"step_s": step_s, "first_step_s": times[0],
           "tokens_per_s": cfg.prompts * cfg.generations * cfg.completion_tokens / step_s}


def cuda_tests(cfg: BenchConfig):
    """test_decoders.py's tests that need CUDA (skipped without it): pytest's counts."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda",
                           str(Path(__file__).parent / "tests" / "test_decoders.py")],
                          capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1]
    yield {"exit_code": done.returncode, "summary": summary,
           "tests": {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped)",
                                                             summary)}}


RUNS = {"cuda_tests": cuda_tests, "decode": decode_speed, "ours": ours, "trl": trl,
        "logprob_gap": logprob_gaps}
# --stages, in order of value, and the seconds each is guessed to need at real size on one GPU
# (guesses before any GPU run; the records' "seconds" say); on the tiny model, none.
STAGES = {"cuda_tests": 60, "decode": 150, "step": 150, "trl": 60, "lora": 60, "logprob_gap": 60,
          "scaling": 400}
SCALING = {"generations": [2, 4, 8, 16], "completion_tokens": [16, 64, 256],
           "image_size": [56, 224, 448]}


def stage_runs(cfg: BenchConfig, stage: str) -> list[tuple[str, dict]]:
    """The child runs of a stage: (RUNS key, flags changed); one of the stage's name if not said."""
    decoders = cfg.decoders.split(",")
    return {"step": [("ours", {"lora_rank": 0, "decoders": d}) for d in decoders],
            "lora": [("ours", {"model": cfg.lora_model or cfg.model, "decoders": decoders[0]})],
            "scaling": [("ours", {"lora_rank": 0, "decoders": decoders[0], name: value})
                        for name, values in SCALING.items() for value in values]
            }.get(stage, [(stage, {})])


def staged(cfg: BenchConfig) -> list[dict]:
    """Every result of --stages, printed, flushed and appended to --json the moment it is made."""
    deadline = time.monotonic() + (cfg.budget_s or math.inf)
    records = []

    def record(entry: dict) -> None:
        records.append(entry)
        print(f"{entry['stage']} failed:\n{entry['failed']}" if "failed" in entry else
              json.dumps(entry), flush=True)
        if cfg.json:
            with open(cfg.json, "a") as out:
                out.write(json.dumps(entry) + "\n")
    record({"stage": "setup", "gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None,
            **{name: importlib.util.find_spec(name) and importlib.metadata.version(name)
               for name in ("torch", "transformers", "trl", "datasets", "pyarrow")},
            "config": asdict(cfg)})
    for stage in cfg.stages.split(","):
        if deadline - time.monotonic() <= (STAGES[stage] if cfg.model else 0):
            print(f"skipped (budget): {stage}", flush=True)
            record({"stage": stage, "skipped": "budget"})
            continue
        start = time.monotonic()

        def stage_record(result: dict) -> None:
            record({"stage": stage, **result, "seconds": time.monotonic() - start})
        for run, changes in stage_runs(cfg, stage):
            if time.monotonic() < deadline:  # else the last one was stopped, and said so
                child(cfg, run, deadline, stage_record, **changes)
    return records


def child(cfg: BenchConfig, run: str, deadline: float, record, **changes) -> None:
    """Run one part (RUNS) in a fresh process, so its peak memory is its own. Each result goes
    to record the moment it is printed, and so does why it ended without one; at the deadline
    (time.monotonic()) it and all it started are killed."""
    settings = {**asdict(cfg), **changes, "run": run, "stages": "", "json": ""}
    command = [sys.executable, __file__, *(f"--{k}={v}" for k, v in settings.items())]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    seconds = min(max(deadline - time.monotonic(), 0), threading.TIMEOUT_MAX)
    timer = threading.Timer(seconds, os.killpg, [process.pid, signal.SIGKILL])
    timer.start()
    output = collections.deque(maxlen=30)  # the last lines, to say why it failed
    for line in process.stdout:
        if line.startswith("RESULT "):
            record(json.loads(line.removeprefix("RESULT ")))
        else:
            output.append(line)
    process.wait()
    timer.cancel()
    if time.monotonic() >= deadline:
        record({"stopped": "budget"})
    elif process.returncode:
        record({"failed": "".join(output)})


def print_tables(cfg: BenchConfig, records: list[dict]) -> None:
    """The records as tables; what failed or was skipped is left out (its record says why)."""
    done = [r for r in records if not {"failed", "skipped", "stopped"} & r.keys()]
    of = lambda stage: [r for r in done if r["stage"] == stage]
    trainers = [(f"ours, {r['decoder']} decoder", r) for r in of("step")]
    trainers += [(f"ours, {r['decoder']} decoder, LoRA r={r['lora_rank']} on "
                  f"{r['model'] or 'the tiny model'} (no reference copy)", r) for r in of("lora")]
    trainers += [("TRL GRPOTrainer", r) for r in of("trl")]
    memory = "peak GPU memory allocated" if cfg.device == "cuda" else "peak process memory (RSS)"
    trl_s = [r["step_s"] for r in of("trl")]
    print(f"\n{cfg.prompts} prompts x G={cfg.generations}, {cfg.completion_tokens} tokens each, "
          f"{cfg.image_size} px images, {cfg.dtype}, {cfg.device}, median of {cfg.steps} steps "
          f"after {cfg.warmup} warm-up\n\n| trainer | s / step | completion tokens / s "
          f"| {memory}, MB | / TRL's step time (goal: 0.3 or less) |\n|---|---|---|---|---|")
    for name, r in trainers:
        print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} "
              f"| {format(r['step_s'] / trl_s[0], '.2f') if trl_s else '-'} |")
    if decode := of("decode"):
        print(f"\nmemory bandwidth: {decode[0]['bandwidth_gbs']:.0f} GB/s (a 1 GiB copy, read "
              "and written); the bound is the bytes a token reads over it\n\n"
              "| decoder | rows | ms / token | bound, ms | x bound (goal: 3 or less) "
              "| GB read / token | GB/s used | compile (first rollout's extra), s |\n"
              "|---|---|---|---|---|---|---|---|")
    for r in decode[1:]:
        print(f"| {r['decoder']} | {r['rows']} | {r['ms']:.2f} | {r['bound_ms']:.2f} | "
              f"{r['ms'] / r['bound_ms']:.1f} | {r['gb_read']:.2f} | "
              f"{r['gb_read'] / r['ms'] * 1000:.0f} | {r.get('compile_s', 0):.1f} |")
    if gaps := of("logprob_gap"):
        print(f"\nsampler vs training forward, {cfg.dtype}, {gaps[0]['rows']} rows:\n\n"
              "| decoder | max log-prob gap | tokens clipped by the gap alone |\n|---|---|---|")
    for r in gaps:
        print(f"| {r['decoder']} | {r['max_gap']:.2g} | {100 * r['clipped']:.2f}% |")
    if scaling := of("scaling"):
        print("\nour step time as one setting changes:\n\n"
              "| G | tokens | image px | s / step | prefill s |\n|---|---|---|---|---|")
    for r in scaling:
        print(f"| {r['generations']} | {r['completion_tokens']} | {r['image_size']} | "
              f"{r['step_s']:.3f} | {r['prefill_s']:.3f} |")


def main():
    cfg = common.parse_args(BenchConfig)
    if cfg.run:
        cuda = cfg.device == "cuda"
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        for result in RUNS[cfg.run](cfg):
            peak = (torch.cuda.max_memory_allocated() if cuda else
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            print("RESULT " + json.dumps({**result, "peak_mb": peak / 2 ** 20}), flush=True)
        return
    if not set(cfg.decoders.split(",")) <= set(sampler.DECODERS):
        raise SystemExit(f"--decoders {cfg.decoders}: each must be one of {sampler.DECODERS}")
    if not set(cfg.stages.split(",")) <= set(STAGES):
        raise SystemExit(f"--stages {cfg.stages}: each must be one of {', '.join(STAGES)}")
    if "decode" in cfg.stages and any(int(n) % cfg.generations for n in
                                      cfg.decode_rows.split(",")):
        raise SystemExit(f"--decode_rows {cfg.decode_rows}: each must be a multiple of "
                         f"--generations {cfg.generations}")
    print_tables(cfg, staged(cfg))


if __name__ == "__main__":
    main()
