"""Checkpoints: saving them (crash-safe, gathered from FSDP2), finding them, and resuming.

A checkpoint is a Hugging Face folder that from_pretrained loads, plus, for
step-N checkpoints, trainer_state.pt: the optimizer and the loop's state.
"""

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)


def save(model, processor, folder, extra: dict, optimizer=None,
                    trainer_state=None) -> None:
    """A Hugging Face folder that from_pretrained loads, gathered from FSDP2 on rank 0. Collective.

    Written to folder.tmp and renamed into place only when complete, so a crash
    at any moment leaves the previous checkpoint loadable. With an optimizer, the
    full optimizer state and trainer_state (tensors, numbers, strings: loadable
    with weights_only=True) go to trainer_state.pt for an exact resume.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:
        folder = Path(folder)
        tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        model.generation_config.use_cache = True
        model.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        for name, content in extra.items():
            (tmp / name).write_text(json.dumps(content, indent=1))
        if optimizer is not None:
            torch.save({**trainer_state, "optimizer": optimizer_state}, tmp / "trainer_state.pt")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_trainer_state(model, optimizer, folder) -> dict:
    """Restore the optimizer from a checkpoint's trainer_state.pt and return the rest of it."""
    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"),
                             options=StateDictOptions(full_state_dict=True))
    return state


def step_checkpoints(out: Path) -> list[Path]:
    """The complete step-N checkpoints in out, oldest first (step-N.tmp is an unfinished save)."""
    return sorted((p for p in out.glob("step-*") if p.name.removeprefix("step-").isdigit()),
                  key=lambda p: int(p.name.removeprefix("step-")))


def prune(out: Path, keep: int) -> None:
    """On rank 0, delete all but the newest keep step-N checkpoints."""
    if dist.get_rank() == 0:
        for old in step_checkpoints(out)[:-keep or None]:
            shutil.rmtree(old)


def resume_folder(resume: str, out: Path) -> str | None:
    """The checkpoint to resume from: --resume PATH, or with auto the newest step-N (or None)."""
    if resume == "auto":
        found = step_checkpoints(out)
        return str(found[-1]) if found else None
    if resume and not (Path(resume) / "trainer_state.pt").exists():
        raise SystemExit(f"--resume {resume}: no trainer_state.pt there; pass a step-N folder "
                         "or auto")
    return resume or None
