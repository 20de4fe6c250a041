"""A modelled GPU deployment: model shape, KV budget and engine limits.

The model configs are written to a local folder (no download): only ``config.json``
matters, since the scheduler needs the KV layout and nothing else. vLLM builds its model
config from them (``EngineArgs(load_format="dummy", skip_tokenizer_init=True)``); no weights
exist.

- ``llama-3.1-8b``: one H100 80 GB.
- ``llama-3.1-70b-tp4``: one GPU's share of a 4-way tensor-parallel 70B on H100 80 GB.
- ``gemma-3-12b``: Gemma 3 12B's text model on one H100 80 GB. 48 layers, of which every
  6th attends over the whole context and the other five over a 1024-token sliding window
  (``layer_types``): with vLLM's hybrid KV cache manager the sliding layers keep only the
  window's KV.
- ``glm-4.5-355b-ep8``: GLM-4.5 (355B parameters, 32B active per token) on 8x H200 141 GB,
  bf16, attention tensor-parallel 8 and the 160 routed experts expert-parallel 8. Modelled
  as one GPU's share, as the 70B: 12 of the 96 query heads, 1 of the 8 KV heads, 20 routed
  experts of which 1 is active per token on average (8 of 160), an eighth of the shared
  expert (``shared_expert_intermediate_size``, the field the weight count reads) and of
  the first three layers' dense MLP. The vocabulary is kept whole (as the 70B's), so the
  weights count the embeddings and the LM head unsplit: 2.7 GB more per GPU than a
  vocab-parallel deployment holds, which leaves the KV pool that much smaller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.core.model_shapes import model_dims
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
    "gemma-3-12b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 262208,
        "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 8,
        "query_pre_attn_scalar": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    # One GPU's share of GLM-4.5 on 8 GPUs (attention TP 8, experts EP 8): the docstring.
    "glm-4.5-355b-ep8": {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": 5120,
        "intermediate_size": 12288 // 8,  # the first three layers' dense MLP
        "num_hidden_layers": 92,
        "num_attention_heads": 96 // 8,
        "num_key_value_heads": 8 // 8,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "use_qk_norm": True,
        "n_routed_experts": 160 // 8,
        "n_shared_experts": 1,
        "shared_expert_intermediate_size": 1536 // 8,
        "moe_intermediate_size": 1536,
        "num_experts_per_tok": 1,  # 8 of 160 per token: one of a GPU's 20 on average
        "first_k_dense_replace": 3,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 0,
        "vocab_size": 151552,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338],
    },
}
# The GPU each model's deployment runs on, where it is not an H100 80 GB.
MODEL_GPU_MEMORY_BYTES = {"glm-4.5-355b-ep8": 141e9}


@dataclass(frozen=True)
class Deployment:
    """``model``: a name of ``MODEL_SHAPES`` or a folder with a ``config.json``.
    ``num_blocks``: the KV pool, when known (a real server's); else derived from memory."""

    model: str = "llama-3.1-8b"
    device: str = "cuda"
    num_blocks: int | None = None
    gpu_memory_bytes: float | None = None  # None: the model's GPU (MODEL_GPU_MEMORY_BYTES)
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

    def __post_init__(self) -> None:
        if self.gpu_memory_bytes is None:
            memory = MODEL_GPU_MEMORY_BYTES.get(self.model, 80e9)
            object.__setattr__(self, "gpu_memory_bytes", memory)

    def hf_config(self) -> dict:
        if self.model in MODEL_SHAPES:
            shape = MODEL_SHAPES[self.model]
            if "architectures" in shape:  # a family of its own, not a Llama shape
                return {"torch_dtype": "bfloat16", **shape}
            return {**LLAMA_31, **shape}
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
        weights = self.weight_bytes()
        budget = self.gpu_memory_bytes * self.memory_utilization
        free = budget - weights - self.activation_reserve_bytes
        if free <= 0:
            raise ValueError(f"{self.model} does not fit in {self.gpu_memory_bytes / 1e9:.0f} GB")
        return int(free // (self.block_size * self.kv_bytes_per_token()))

    def weight_bytes(self) -> int:
        """bf16 weights; the first ``first_k_dense_replace`` layers of a mixture of experts
        (DeepSeek, GLM-4.5) have a dense MLP of ``intermediate_size`` instead of experts."""
        hf = self.hf_config()
        params = parameter_count(hf)
        dense = hf.get("first_k_dense_replace")
        dims = model_dims(hf)
        if dims.num_experts and isinstance(dense, int) and dense > 0:
            hidden = dims.attention.hidden_size
            matrices = 3 if dims.gated_mlp else 2
            moe = (
                matrices
                * hidden
                * (dims.intermediate_size * dims.num_experts + dims.shared_expert_intermediate_size)
                + hidden * dims.num_experts
            )
            params -= dense * (moe - matrices * hidden * int(hf["intermediate_size"]))
        return params * 2
