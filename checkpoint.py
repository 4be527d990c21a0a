"""Checkpoints: saving them (crash-safe, gathered from FSDP2), finding them, and resuming.

A checkpoint is a Hugging Face folder that from_pretrained loads, plus, for
step-N checkpoints, trainer_state.pt: the optimizer and the loop's state.
"""

import dataclasses
import fcntl
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

import lora
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)


def save(model, processor, folder, extra: dict, optimizer=None, trainer_state=None,
         reference=None) -> None:
    """A Hugging Face folder that from_pretrained loads, gathered from FSDP2 on rank 0. Collective.

    Written to folder.tmp and renamed into place only when complete, so a crash
    at any moment leaves the previous checkpoint loadable. With an optimizer, the
    full optimizer state and trainer_state (tensors, numbers, strings: loadable
    with weights_only=True) go to trainer_state.pt for an exact resume, with the
    reference model's weights when one is given (a refreshed reference is no
    longer the base model).

    A model with LoRA adapters saves them in PEFT's format: a step-N folder
    holds only them (and the rest of the state), folder/ of a final save holds
    the merged model and folder/adapter/ the adapters.
    """
    adapters = lora.has_adapters(model)
    # The adapters alone train: a step-N checkpoint of them gathers nothing else.
    only_adapters = adapters and optimizer is not None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=dataclasses.replace(
        options, ignore_frozen_params=only_adapters))
    if optimizer is not None:
        trainer_state = {**trainer_state,
                         "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    if reference is not None:
        trainer_state["reference"] = get_model_state_dict(reference, options=options)
    if dist.get_rank() == 0:
        folder = Path(folder)
        tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        model.generation_config.use_cache = True
        # A full disk shows as an OSError, or from torch.save as a RuntimeError ("unexpected pos").
        try:
            if adapters:
                lora.save_adapter(tmp if only_adapters else tmp / "adapter", state,
                                  model.lora_config)
                processor.save_pretrained(tmp if only_adapters else tmp / "adapter")
            if not only_adapters:
                merged = lora.merged(state, model.lora_config) if adapters else state
                model.save_pretrained(tmp, state_dict=merged)
                processor.save_pretrained(tmp)
            # The adapter folder is a checkpoint eval.py reads too: its training config and data.
            for target in [tmp, tmp / "adapter"] if adapters and not only_adapters else [tmp]:
                for name, content in extra.items():
                    (target / name).write_text(json.dumps(content, indent=1))
            if optimizer is not None:
                torch.save(trainer_state, tmp / "trainer_state.pt")
        except (OSError, RuntimeError) as error:
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(folder.parent).free / 2 ** 30
            raise SystemExit(f"saving {folder} failed: {error} ({free:.1f} GiB free on that disk); "
                             "the previous checkpoint is untouched") from error
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


# Flags that may change on a resume without changing what is trained (not --steps or --epochs:
# they set the length of the learning-rate schedule).
BOOKKEEPING = {"resume", "overwrite", "output_dir", "cache_dir", "eval_every", "eval_size",
               "save_every", "keep_checkpoints", "rollouts_every", "report_to"}


def fingerprint(samples: list[dict]) -> str:
    """Which questions, in which order: sample indices mean the same only on the same data."""
    return hashlib.sha1("\n".join(s["id"] for s in samples).encode()).hexdigest()


def resume(folder, model, optimizer, reference, schedule, rngs: dict, config: dict,
           samples: list) -> tuple[list[int], int, float]:
    """Restore a run from a step-N checkpoint's trainer_state.pt: the optimizer, the schedule,
    the random generators (rngs: name -> generator) and the reference, if it was saved.
    Returns the rest of the data order, the step and the base accuracy. Collective.

    It must have trained on the same samples; settings that changed since are
    listed. Only rank 0 reads the file; the optimizer's and reference's tensors
    are scattered from it shard by shard, the rest is broadcast.
    """
    state = {}
    if dist.get_rank() == 0:
        state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True)
    optimizer_state, reference_state = state.pop("optimizer", {}), state.pop("reference", None)
    state["with_reference"] = reference_state is not None
    shared = [state]
    dist.broadcast_object_list(shared, src=0)
    state = shared[0]
    # Checkpoints from before this check hold no fingerprint; they are taken on trust.
    if state.get("training_data", fingerprint(samples)) != fingerprint(samples):
        raise SystemExit(f"--resume {folder}: it trained on other questions than these "
                         f"({len(samples)} now): resume with the same --data, split files and "
                         "filters, or start a new run")
    saved = json.loads((Path(folder) / "train_config.json").read_text())
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in config.items()
               if k in saved and saved[k] != v and k not in BOOKKEEPING]
    if changed and dist.get_rank() == 0:
        print("resuming with changed settings: " + ", ".join(changed))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    if reference is not None and state["with_reference"]:
        set_model_state_dict(reference, reference_state or {}, options=options)
    schedule.load_state_dict(state["schedule"])
    for name, rng in rngs.items():
        rng.set_state(state[name])
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"resumed from {folder} at step {state['step']}" + (
            "" if state["world"] == world else
            f" (saved on {state['world']} ranks, now {world}: correct, but not bit-exact)"))
    return state["order"].tolist(), state["step"], state["base_accuracy"]


def step_checkpoints(out: Path) -> list[Path]:
    """The complete step-N checkpoints in out, oldest first (step-N.tmp is an unfinished save)."""
    return sorted((p for p in out.glob("step-*") if p.name.removeprefix("step-").isdigit()),
                  key=lambda p: int(p.name.removeprefix("step-")))


def prune(out: Path, keep: int) -> None:
    """On rank 0, delete all but the newest keep step-N checkpoints."""
    if dist.get_rank() == 0:
        for old in step_checkpoints(out)[:-keep or None]:
            shutil.rmtree(old)


def incomplete(folder: Path) -> str:
    """What makes a step-N folder unusable for a resume ("" if nothing): a missing file, or a
    weights or state file cut short (by a full disk, or a copy that stopped)."""
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        return "no config.json or adapter_config.json"
    if not (folder / "trainer_state.pt").is_file():
        return "no trainer_state.pt"
    if not weights:
        return "no *.safetensors"
    if not zipfile.is_zipfile(folder / "trainer_state.pt"):
        return "trainer_state.pt is cut short"
    for path in weights:
        # A safetensors file is an 8-byte header length, a JSON header, then the tensors'
        # bytes up to the largest end offset the header names.
        with open(path, "rb") as f:
            try:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
            except (ValueError, UnicodeDecodeError):
                return f"{path.name} has no readable header"
        tensors = [t for name, t in header.items() if name != "__metadata__"]
        end = max((t["data_offsets"][1] for t in tensors), default=0)
        if path.stat().st_size < 8 + length + end:
            return f"{path.name} is cut short"
    return ""


def resume_folder(resume: str, out: Path) -> str | None:
    """The checkpoint to resume from: --resume PATH, or with auto the newest complete step-N
    (None if there is none); an incomplete one is passed over, and said so."""
    if resume == "auto":
        for folder in reversed(step_checkpoints(out)):
            if not (problem := incomplete(folder)):
                return str(folder)
            if dist.get_rank() == 0:
                print(f"not resuming from {folder}: {problem}; trying the one before")
        return None
    if resume and (problem := incomplete(Path(resume))):
        raise SystemExit(f"--resume {resume}: {problem}; pass a complete step-N folder or auto")
    if resume and Path(resume).parent.resolve() == out.resolve():
        # A later --resume auto would take the abandoned run's later checkpoints for this one's.
        step = Path(resume).name.removeprefix("step-")
        later = [f.name for f in step_checkpoints(out)
                 if step.isdigit() and int(f.name.removeprefix("step-")) > int(step)]
        if later:
            raise SystemExit(f"--resume {resume}: {out} also holds the later checkpoints "
                             f"{', '.join(later)}; move them out of it, or resume into another "
                             "--output_dir")
    return resume or None


# What a run writes into its output folder (besides its step-N checkpoints).
RUN_FILES = ("metrics.jsonl", "rollouts.jsonl", "final", "tensorboard", "wandb", "curves.png")
_lock = None  # rank 0's open run.lock (see claim)


def claim(out: Path, resume: str, overwrite: bool) -> None:
    """Make out this run's folder: refuse one that a live run holds, or that holds another run
    unless it is resumed or overwritten (then, on rank 0, that run's files are removed).
    Collective.

    Rank 0 holds an exclusive lock on out/run.lock until its process ends, even
    by kill -9, so two runs never write into one folder at once.
    """
    global _lock
    problem = ""
    if dist.get_rank() == 0:
        if _lock is not None:  # an earlier run in this process (tests call main() twice)
            _lock.close()
        try:
            out.mkdir(parents=True, exist_ok=True)
            _lock = open(out / "run.lock", "w")
            fcntl.flock(_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = (f"--output_dir {out}: another run is writing there now; wait for it, or "
                       "pass another --output_dir")
        except OSError as error:
            problem = f"--output_dir {out}: cannot write there ({error}); pass another --output_dir"
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise SystemExit(shared[0])
    paths = [*(out / name for name in RUN_FILES), *out.glob("step-*")]
    held = [p.name for p in paths if p.exists()]
    if held and not resume and not overwrite:
        raise SystemExit(f"--output_dir {out} holds a run ({', '.join(sorted(held)[:4])}): pass "
                         "--resume auto to go on with it, --overwrite true to replace it, or "
                         "another --output_dir")
    if overwrite and not resume and dist.get_rank() == 0:
        for path in (out / name for name in held):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    dist.barrier()


def truncate_logs(out: Path, step: int) -> None:
    """On rank 0, drop the log lines of steps after step (a resumed run writes them again),
    and a last line cut short by a crash; the file is replaced whole."""
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        path = out / name
        if dist.get_rank() == 0 and path.exists():
            lines = path.read_text().splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # cut short by a crash
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
            tmp.replace(path)
