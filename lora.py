"""Low-rank adapters (LoRA) on the language model, saved and read in PEFT's format.

Each targeted nn.Linear W of the language model becomes W x + (alpha / r) B A x,
with A (r, in) random and B (out, r) zero, so training starts at the base model.
Only A and B train; everything else is frozen. With the adapters switched off
the model is the base model again, so the frozen GRPO reference needs no copy.
"""

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# Every linear layer of Qwen2-VL's decoder, as the common Qwen-VL LoRA recipes target.
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# PEFT's names for a module of the model it wraps.
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """base(x) + scale * lora_B(lora_A(x)); the adapter adds nothing while disabled.

    No dropout: in GRPO it would make the policy that computes the ratio differ
    from the one that sampled (PEFT's lora_dropout of an adapter read is ignored).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        # PEFT's initialisation: A as nn.Linear's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.scale * self.lora_B(self.lora_A(x))


def target_pattern(targets: str) -> str:
    """The regex (PEFT's target_modules as a string) of the language model's targeted linears."""
    names = "|".join(re.escape(t) for t in targets.split(","))
    return rf"model\.language_model\..*\.({names})"


def add_adapters(model: nn.Module, base_path: str, rank: int, alpha: float,
                 pattern: str = target_pattern(TARGETS)) -> nn.Module:
    """Freeze model (loaded from base_path) and wrap every linear whose name matches pattern in a
    LoRALinear."""
    model.requires_grad_(False)
    wrapped = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and re.fullmatch(pattern, name)]
    if not wrapped:
        raise SystemExit(f"no linear layer's name matches the LoRA targets {pattern!r}")
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha))
    model.lora_config = {"base_model_name_or_path": base_path, "r": rank, "lora_alpha": alpha,
                         "lora_dropout": 0.0, "target_modules": pattern}
    return model


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "lora_config")


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model for the duration (a no-op on a model without adapters)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def adapter_weights(state: dict) -> dict:
    """The adapters of a full or adapters-only state dict, under PEFT's names."""
    return {PEFT_PREFIX + k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def merged(state: dict, config: dict) -> dict:
    """A full state dict of a model with adapters -> the plain model's, W + scale B A folded in."""
    scale, plain = config["lora_alpha"] / config["r"], {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base." in key:
            prefix, _, param = key.rpartition(".base.")
            if param == "weight":
                A, B = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
                value = (value.float() + scale * B.float() @ A.float()).to(value.dtype)
            key = f"{prefix}.{param}"
        plain[key] = value
    return plain


def save_adapter(folder: Path, state: dict, config: dict) -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them."""
    peft_config = {"peft_type": "LORA", "task_type": None, "bias": "none", "fan_in_fan_out": False,
                   "inference_mode": True, "init_lora_weights": True, "use_rslora": False, **config}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=1))
    weights = {k: v.contiguous() for k, v in adapter_weights(state).items()}
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def base_of(folder) -> str | None:
    """The base model folder that an adapter folder's adapter_config.json names (None: no adapter
    folder)."""
    config = Path(folder) / "adapter_config.json"
    return json.loads(config.read_text())["base_model_name_or_path"] if config.exists() else None


def load_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """model (the base) with the adapters of a PEFT LoRA folder added and loaded."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or config.get(
            "use_dora") or config.get("use_rslora"):
        raise SystemExit(f"{folder}: only plain LoRA adapters (no bias, DoRA or rsLoRA) are read")
    targets = config["target_modules"]
    pattern = targets if isinstance(targets, str) else target_pattern(",".join(targets))
    add_adapters(model, config["base_model_name_or_path"], config["r"], config["lora_alpha"],
                 pattern)
    weights = {k.removeprefix(PEFT_PREFIX): v
               for k, v in load_file(Path(folder) / "adapter_model.safetensors").items()}
    adapters = {k for k, _ in model.named_parameters() if ".lora_" in k}
    if adapters != set(weights):
        odd = sorted(adapters ^ set(weights))
        raise SystemExit(f"{folder}: adapter_model.safetensors does not fit this model's "
                         f"targets, e.g. {odd[0]} ({len(odd)} names differ)")
    model.load_state_dict(weights, strict=False)
    return model
