"""A model's dimensions from its Hugging Face ``config.json``, whatever the family calls them.

The tier profile needs the KV layout (layers, KV heads, head size) and the roofline estimate
needs the parameter count. Llama-style configs name them ``num_hidden_layers``,
``num_attention_heads``, ``num_key_value_heads``, ``hidden_size`` and ``intermediate_size``;
other families vLLM serves use other names:

- GPT-2 and GPT-BigCode: ``n_layer``, ``n_head``, ``n_embd``, ``n_inner`` (null: 4 x hidden),
  and GPT-BigCode's ``multi_query`` (one KV head);
- OPT: ``ffn_dim``;
- Falcon: ``ffn_hidden_size``, ``multi_query`` (one KV head) unless
  ``new_decoder_architecture``, whose KV heads are ``num_kv_heads``; old RW configs
  ``n_head_kv``;
- MPT and DBRX: ``n_layers``, ``n_heads``, ``d_model``, ``expansion_ratio``, and the KV
  heads in ``attn_config.kv_n_heads``;
- ChatGLM: ``num_layers``, ``multi_query_group_num``, ``ffn_hidden_size``;
- mixtures of experts: ``num_local_experts`` (Mixtral), ``num_experts`` (Qwen-MoE),
  ``n_routed_experts`` (DeepSeek), ``moe_num_experts`` (DBRX) experts, of which
  ``num_experts_per_tok`` (or ``moe_top_k``) run per token, each of ``intermediate_size``
  or ``moe_intermediate_size``;
- DeepSeek's multi-head latent attention caches one latent of ``kv_lora_rank`` +
  ``qk_rope_head_dim`` per layer;
- multimodal configs keep the text model's fields in ``text_config``.

A field no name is found for is assumed, with a warning that names it and the value taken.
The assumptions lean towards a bigger model (a Llama-3.1-8B-like layer count and width, a
4 x hidden MLP): the estimate then prices a lost prefix higher, so the TTLs keep pins
longer rather than shorter; pins still go first under memory pressure, so a too-long TTL
costs little. A measured profile (``continuum-tiered profile``) replaces the estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ASSUMED_LAYERS = 32
ASSUMED_HIDDEN = 4096
ASSUMED_HEAD_DIM = 128
ASSUMED_VOCAB = 32_000
ASSUMED_EXPERTS_PER_TOKEN = 2

_LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "model_dim")
_KV_HEADS = ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num")
_MLP = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_top_k")
_FALCON_TYPES = frozenset({"falcon", "RefinedWeb", "RefinedWebModel"})
# Families whose MLP is two matrices (up, down); the others' is gated, three (gate, up, down).
_UNGATED_MLP_TYPES = frozenset(
    {
        "opt",
        "gpt2",
        "gpt_bigcode",
        "gptj",
        "gpt_neox",
        "falcon",
        "RefinedWeb",
        "RefinedWebModel",
        "bloom",
        "mpt",
        "phi",
        "starcoder2",
        "codegen",
    }
)
# (model, field, assumed value) already warned about: the connector reads a config more than
# once while the engine starts, and one warning per field is enough.
_warned: set[tuple[str, str, int]] = set()


@dataclass(frozen=True)
class AttentionDims:
    """What the KV cache's layout depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # of the cached K and V
    assumed: tuple[str, ...] = ()  # the fields whose values were assumed


@dataclass(frozen=True)
class ModelDims:
    attention: AttentionDims
    intermediate_size: int  # of the dense MLP, or of one expert
    gated_mlp: bool
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0: a dense model
    experts_per_token: int = 0
    shared_expert_intermediate_size: int = 0
    assumed: tuple[str, ...] = ()  # the fields whose values were assumed, attention's too


def text_config(config: Mapping[str, object]) -> Mapping[str, object]:
    """The text model's config: ``text_config`` of a multimodal config, else ``config``."""
    nested = config.get("text_config")
    if isinstance(nested, Mapping) and _first(config, _LAYERS) is None:
        return nested
    return config


def config_name(config: Mapping[str, object]) -> str:
    for key in ("_name_or_path", "model_type"):
        value = config.get(key)
        if isinstance(value, str) and value:
            return value
    return "unknown"


class _Reader:
    """Reads fields of one config, assuming (and warning about) the missing ones."""

    def __init__(self, config: Mapping[str, object], name: str | None) -> None:
        self.name = name or config_name(config)
        self.config = text_config(config)
        self.assumed: list[str] = []

    def first(self, names: tuple[str, ...]) -> int | None:
        return _first(self.config, names)

    def pick(self, names: tuple[str, ...], default: int, why: str) -> int:
        found = self.first(names)
        if found is None:
            self.assume(names, default, why)
            return default
        return found

    def assume(self, names: tuple[str, ...], value: int, why: str) -> None:
        self.assumed.append(names[0])
        key = (self.name, names[0], value)
        if key in _warned:
            return
        _warned.add(key)
        logger.warning(
            "model %s: no %s in its config; assuming %s = %d (%s). The tier profile is "
            "estimated from it; a measured one (`continuum-tiered profile`) replaces it.",
            self.name,
            " / ".join(names),
            names[0],
            value,
            why,
        )

    def attention(self) -> AttentionDims:
        num_layers = self.pick(_LAYERS, ASSUMED_LAYERS, "a Llama-3.1-8B-like depth")
        hidden = self.pick(_HIDDEN, ASSUMED_HIDDEN, "a Llama-3.1-8B-like width")
        num_heads = self.pick(_HEADS, max(1, hidden // ASSUMED_HEAD_DIM), "heads of 128")
        head_dim = self.first(("head_dim", "hidden_size_per_head")) or max(1, hidden // num_heads)
        kv_heads, head_dim = _kv_layout(self.config, num_heads, head_dim)
        return AttentionDims(num_layers, hidden, num_heads, kv_heads, head_dim, tuple(self.assumed))


def attention_dims(config: Mapping[str, object], name: str | None = None) -> AttentionDims:
    """The KV layout of the (text) model of ``config``; never raises on a missing field."""
    return _Reader(config, name).attention()


def model_dims(config: Mapping[str, object], name: str | None = None) -> ModelDims:
    """All dimensions of the (text) model of ``config``; never raises on a missing field."""
    reader = _Reader(config, name)
    attention = reader.attention()
    num_experts = reader.first(_EXPERTS) or 0
    per_token = 0
    if num_experts:
        per_token = reader.pick(_EXPERTS_PER_TOKEN, ASSUMED_EXPERTS_PER_TOKEN, "two per token")
    mlp_names = ("moe_intermediate_size", *_MLP) if num_experts else _MLP
    mlp = reader.first(mlp_names)
    ratio = _positive_number(reader.config.get("expansion_ratio"))
    if mlp is None and ratio is not None:
        mlp = int(ratio * attention.hidden_size)  # MPT
    if mlp is None:
        mlp = 4 * attention.hidden_size
        reader.assume(mlp_names, mlp, "4 x hidden, a GPT-style MLP")
    vocab = reader.pick(("vocab_size", "padded_vocab_size"), ASSUMED_VOCAB, "Llama-2's")
    return ModelDims(
        attention=attention,
        intermediate_size=mlp,
        gated_mlp=reader.config.get("model_type") not in _UNGATED_MLP_TYPES,
        vocab_size=vocab,
        tie_word_embeddings=reader.config.get("tie_word_embeddings") is True,
        num_experts=num_experts,
        experts_per_token=per_token,
        shared_expert_intermediate_size=reader.first(("shared_expert_intermediate_size",)) or 0,
        assumed=tuple(reader.assumed),
    )


def _kv_layout(config: Mapping[str, object], num_heads: int, head_dim: int) -> tuple[int, int]:
    """(KV heads, head size) of the cache."""
    latent = _first(config, ("kv_lora_rank",))
    if latent is not None:  # DeepSeek's MLA: one latent vector per token and layer
        return 1, latent + (_first(config, ("qk_rope_head_dim",)) or 0)
    falcon_new = config.get("model_type") in _FALCON_TYPES and config.get(
        "new_decoder_architecture"
    )
    if config.get("multi_query") is True and not falcon_new:
        return 1, head_dim
    kv_heads = _first(config, _KV_HEADS)
    attn_config = config.get("attn_config")
    if kv_heads is None and isinstance(attn_config, Mapping):
        kv_heads = _first(attn_config, ("kv_n_heads",))  # MPT, DBRX
    return kv_heads or num_heads, head_dim


def _first(config: Mapping[str, object], names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that holds a positive integer."""
    for key in names:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _positive_number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


@dataclass(frozen=True)
class SlidingWindowLayout:
    """Which layers of a model attend over a sliding window: vLLM's hybrid KV cache manager
    keeps only the window's KV for those, and full-length KV for the others."""

    num_layers: int
    sliding: frozenset[int]  # the indices of the sliding-window layers
    window: int

    @property
    def sliding_layers(self) -> int:
        return len(self.sliding)

    def kv_bytes(
        self, tokens: int, bytes_per_token_layer: int, block_size: int, hybrid: bool
    ) -> int:
        """KV bytes one request of ``tokens`` holds: with the hybrid manager, a sliding layer
        keeps the window's blocks (vLLM frees the ones before it; one more block for the
        window's start) and a full layer all of its blocks; without it every layer keeps
        all of them."""
        blocks = -(-tokens // block_size)
        if not hybrid:
            return self.num_layers * blocks * block_size * bytes_per_token_layer
        window_blocks = min(blocks, -(-(self.window - 1) // block_size) + 1)
        full = self.num_layers - self.sliding_layers
        per_layer_blocks = full * blocks + self.sliding_layers * window_blocks
        return per_layer_blocks * block_size * bytes_per_token_layer


def sliding_window_layout(config: Mapping[str, object]) -> SlidingWindowLayout | None:
    """The sliding-window layers of a model that mixes them with full-attention ones, from
    ``layer_types`` (Gemma 3, Gemma 2 and others in recent configs), else Gemma 3's
    ``sliding_window_pattern`` (every N-th layer full) or Gemma 2's alternation. None when no
    layer slides or every layer does (one KV cache group: the manager changes nothing)."""
    text = text_config(config)
    window = _first(text, ("sliding_window",))
    num_layers = _first(text, _LAYERS)
    if window is None or num_layers is None:
        return None
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        kinds = enumerate(layer_types)
        sliding = frozenset(i for i, kind in kinds if kind == "sliding_attention")
    elif (pattern := _first(text, ("sliding_window_pattern",))) is not None:
        sliding = frozenset(i for i in range(num_layers) if (i + 1) % pattern != 0)
    elif text.get("model_type") == "gemma2":
        sliding = frozenset(range(0, num_layers, 2))  # even layers slide
    else:
        return None
    if len(sliding) in (0, num_layers):
        return None
    return SlidingWindowLayout(num_layers, sliding, window)
