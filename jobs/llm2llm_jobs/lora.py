"""A student's LoRA adapter merged into a vLLM engine's base-model weights, for failure inference on CPU.

vLLM's LoRA path on CPU (its punica kernels in plain torch) made greedy generation about 3x slower than the
base model here: 128 GSM8K prompts x 64 tokens took ~50 s with the adapter applied per token, 12-14 s merged
(``bench/results/infer_warm_vs_hf.md``). An engine that serves one adapter at a time does not need that path:
W + (alpha / r) * B @ A, written into the engine's weights once per adapter (vLLM's in-place
``reload_weights``, which redoes the CPU weight packing), costs about half a second for SmolLM2-135M and
nothing per token. The merged weights are the ones PEFT's ``merge_and_unload`` makes (the same float32
arithmetic), so vLLM and HF still agree token for token. On CUDA the engine keeps vLLM's LoRA requests: its
kernels are fast there, and a reload of a large model per adapter is not.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PREFIX = "base_model.model."
# Adapter settings whose meaning a plain W + s * B @ A merge would get wrong: refused with a clear error.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None, "bias": "none"}


def adapter_deltas(adapter_dir: str) -> dict[str, Any]:
    """The adapter as base-weight name -> float32 delta (s * B @ A). Raises ValueError, naming the file and
    field, for an adapter that is not a plain LoRA of linear layers."""
    import torch
    from safetensors.torch import load_file

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    cfg = json.loads(Path(config_path).read_text())
    for field, plain in _UNSUPPORTED.items():
        if (cfg.get(field) or plain) != plain:
            raise ValueError(f"{config_path}: {field}={cfg[field]!r} cannot be merged into the base weights")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[key.removeprefix(_PREFIX).replace(".lora_A.weight", ".weight")] = \
                (b.to(torch.float32) @ a.to(torch.float32)) * scale
        elif ".lora_B." not in key:
            raise ValueError(f"{adapter_dir}: adapter weight {key} is not a LoRA of a linear layer")
    return deltas


def base_weights(model_dir: str) -> Iterator[tuple[str, Any]]:
    """The base model's checkpoint tensors, by their checkpoint names."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_dir}: no .safetensors weights to merge an adapter into")
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def merged_weights(model_dir: str, adapter_dir: str | None) -> Iterator[tuple[str, Any]]:
    """Every checkpoint tensor of the base model, the adapter's layers with their delta added (float32)."""
    import torch

    deltas = adapter_deltas(adapter_dir) if adapter_dir else {}
    for key, w in base_weights(model_dir):
        delta = deltas.pop(key, None)
        yield key, w if delta is None else w.to(torch.float32) + delta
    if deltas:
        raise ValueError(f"{adapter_dir}: adapter weights match no weight of {model_dir}: {sorted(deltas)[:3]}")


_UNKNOWN = object()


class MergedAdapter:
    """Which adapter a vLLM engine's weights hold (None: the base model), and the switch between them."""

    def __init__(self, llm: Any, model_dir: str) -> None:
        self._llm, self._model_dir = llm, model_dir
        self._holds: object = None

    def use(self, adapter_dir: str | None, key: str | None = None) -> None:
        """Make the engine's weights base + ``adapter_dir`` (or the base model), unless they are already.
        ``key`` names the adapter for that check (its storage location; default the folder)."""
        key = key or adapter_dir
        if self._holds is not _UNKNOWN and self._holds == key:
            return
        self._holds = _UNKNOWN  # a reload that fails half-way leaves weights that are neither
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(self._model_dir, adapter_dir),
                                                           "is_checkpoint_format": True})
        # Cached prefixes were computed with the old weights (a LoRA request would have keyed them apart).
        self._llm.reset_prefix_cache()
        self._holds = key
