"""A tiny random model on disk, so the CPU build of vLLM runs end to end without downloads.

A Llama by default; ``write_tiny_model`` also writes the two other layouts a KV-retention
system meets: a Gemma-3 text model (sliding-window layers beside full-attention ones: vLLM's
hybrid KV cache manager keeps one KV cache group per layer type) and a Mixtral (a mixture of
experts, whose weights dwarf its KV).

vLLM's CPU attention backend rejects head_dim < 64 and needs a block size that is a
multiple of 32 (docs/architecture.md, 'vLLM CPU build'); everything else is kept as small
as it can be.
Weights are not written: engines load it with ``load_format="dummy"`` (random weights).
A WordLevel tokenizer over the words ``w0 .. w{vocab-1}`` is saved beside the config so the
OpenAI server can detokenize replies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyLlamaShape:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    vocab_size: int = 512
    max_position_embeddings: int = 8192


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def hf_config(shape: TinyLlamaShape) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(shape),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


# Role and text of each message, one per line: enough for chat completions (the tests'
# agents) on a model that has no template of its own.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for p in m['content'] %}{{ p.get('text', '') }}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
)


# Three sliding-window layers of a 64-token window (two CPU blocks), then one full-attention
# layer: the ratio is Gemma 3's 5:1 shortened, the window short enough that a turn of a
# test outgrows it.
TINY_SLIDING_WINDOW = 64
_TINY_GEMMA3_LAYERS = ("sliding_attention",) * 3 + ("full_attention",)


def gemma3_config(shape: TinyLlamaShape) -> dict[str, object]:
    return {
        **hf_config(shape),
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "num_hidden_layers": len(_TINY_GEMMA3_LAYERS),
        "layer_types": list(_TINY_GEMMA3_LAYERS),
        "sliding_window": TINY_SLIDING_WINDOW,
        "query_pre_attn_scalar": shape.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }


def mixtral_config(shape: TinyLlamaShape) -> dict[str, object]:
    return {
        **hf_config(shape),
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }


TINY_FAMILIES = {"llama": hf_config, "gemma3": gemma3_config, "mixtral": mixtral_config}


def write_tiny_llama(directory: str | Path, shape: TinyLlamaShape | None = None) -> Path:
    """Write config.json and a WordLevel tokenizer to ``directory``; return the directory."""
    return write_tiny_model(directory, "llama", shape)


def write_tiny_model(
    directory: str | Path, family: str, shape: TinyLlamaShape | None = None
) -> Path:
    """A tiny model of ``family`` (one of ``TINY_FAMILIES``) in ``directory``."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}: expected {sorted(TINY_FAMILIES)}")
    shape = shape or TinyLlamaShape()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = TINY_FAMILIES[family](shape)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out, shape.vocab_size)
    return out


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": 1_000_000,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
