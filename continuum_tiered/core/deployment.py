"""A modelled GPU deployment: model shape, KV budget and engine limits.

The model configs are Llama-3.1 shapes written to a local folder (no download): only
``config.json`` matters, since the scheduler needs the KV layout and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.core.profile import ModelShape
from continuum_tiered.core.roofline import parameter_count

LLAMA_31 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
MODEL_SHAPES = {
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    # One GPU's share of a 4-way tensor-parallel 70B: heads and MLP split four ways.
    "llama-3.1-70b-tp4": {
        "hidden_size": 8192,
        "intermediate_size": 28672 // 4,
        "num_hidden_layers": 80,
        "num_attention_heads": 64 // 4,
        "num_key_value_heads": 8 // 4,
        "head_dim": 128,
    },
}


@dataclass(frozen=True)
class Deployment:
    """``model``: a name of ``MODEL_SHAPES`` or a folder with a ``config.json``.
    ``num_blocks``: the KV pool, when known (a real server's); else derived from memory."""

    model: str = "llama-3.1-8b"
    device: str = "cuda"
    num_blocks: int | None = None
    gpu_memory_bytes: float = 80e9
    memory_utilization: float = 0.9
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    activation_reserve_bytes: float = 4e9  # activations and CUDA graphs, vLLM's profile run
    # LMCache tiers of the peers that have them: host DRAM and local NVMe set aside for KV.
    cpu_tier_bytes: float = 100e9
    disk_tier_bytes: float = 1e12
    # vLLM's AsyncScheduler, as the CUDA build runs by default (the scheduler_driver docs)
    async_scheduling: bool = False

    def hf_config(self) -> dict:
        if self.model in MODEL_SHAPES:
            return {**LLAMA_31, **MODEL_SHAPES[self.model]}
        config = Path(self.model) / "config.json"
        if not config.is_file():
            raise ValueError(
                f"unknown model {self.model!r}: neither one of {sorted(MODEL_SHAPES)} "
                "nor a folder with a config.json"
            )
        return json.loads(config.read_text())

    def write_config(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
        return directory

    def kv_bytes_per_token(self) -> int:
        return ModelShape.from_hf_config(self.hf_config()).kv_bytes_per_token

    def num_gpu_blocks(self) -> int:
        """KV blocks left once the weights and the activation reserve are placed."""
        if self.num_blocks is not None:
            return self.num_blocks
        weights = parameter_count(self.hf_config()) * 2
        budget = self.gpu_memory_bytes * self.memory_utilization
        free = budget - weights - self.activation_reserve_bytes
        if free <= 0:
            raise ValueError(f"{self.model} does not fit in {self.gpu_memory_bytes / 1e9:.0f} GB")
        return int(free // (self.block_size * self.kv_bytes_per_token()))
