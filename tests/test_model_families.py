"""The tier profile's model shape and roofline estimate on other model families' configs,
and vLLM's real Scheduler with the connector on a tiny OPT (issue 18: engines of other
families did not start, ``KeyError: 'intermediate_size'``).

The configs are the Hugging Face ``config.json`` files of the named models, written from
memory and cut to the fields that matter here: the depth (``num_hidden_layers`` /
``n_layer``), the width (``hidden_size`` / ``n_embd``), the heads and KV heads (``n_head``,
``num_key_value_heads``, Falcon's ``multi_query``), the head size (``head_dim``), the MLP
(``intermediate_size`` / ``ffn_dim`` / ``n_inner`` / ``ffn_hidden_size``), the experts
(``num_local_experts``, ``num_experts_per_tok``), ``vocab_size`` and
``tie_word_embeddings``; ``model_type`` says whether the MLP is gated. Where vLLM reads a
config through its ``transformers`` class, ``to_dict()`` adds the class defaults (Gemma 3's
``head_dim`` 256, OPT's ``tie_word_embeddings``); those are written in as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from continuum_tiered.core import model_shapes
from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.pins import ReleaseReason
from continuum_tiered.core.profile import ModelShape
from continuum_tiered.core.roofline import (
    ROOFLINES,
    active_parameter_count,
    estimated_profile,
    parameter_count,
)
from continuum_tiered.policies.static_ttl import StaticTTLPolicy

OPT_125M = {
    "_name_or_path": "facebook/opt-125m",
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "activation_function": "relu",
    "hidden_size": 768,
    "ffn_dim": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "word_embed_proj_dim": 768,
    "max_position_embeddings": 2048,
    "vocab_size": 50272,
    "tie_word_embeddings": True,
}
GPT2 = {  # no n_inner in gpt2's config.json: the MLP is 4 x n_embd, assumed with a warning
    "_name_or_path": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "activation_function": "gelu_new",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
    "tie_word_embeddings": True,
}
FALCON_7B = {  # multi-query attention: one KV head; the MLP is 4 x hidden
    "_name_or_path": "tiiuae/falcon-7b",
    "architectures": ["FalconForCausalLM"],
    "model_type": "falcon",
    "hidden_size": 4544,
    "num_attention_heads": 71,
    "num_hidden_layers": 32,
    "multi_query": True,
    "new_decoder_architecture": False,
    "num_kv_heads": 71,  # FalconConfig's default, ignored unless new_decoder_architecture
    "ffn_hidden_size": 18176,
    "parallel_attn": True,
    "vocab_size": 65024,
    "tie_word_embeddings": True,
}
FALCON_40B_RW = {  # the original RefinedWeb config: n_head_kv grouped-query heads
    "_name_or_path": "tiiuae/falcon-40b",
    "model_type": "RefinedWeb",
    "hidden_size": 8192,
    "n_head": 128,
    "n_head_kv": 8,
    "n_layer": 60,
    "vocab_size": 65024,
}
MIXTRAL_8X7B = {
    "_name_or_path": "mistralai/Mixtral-8x7B-v0.1",
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
GEMMA3_12B = {  # the multimodal config; the text model's fields are in text_config
    "_name_or_path": "google/gemma-3-12b-it",
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_attention_heads": 16,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "head_dim": 256,  # not hidden_size / heads (240)
        "vocab_size": 262208,
        "tie_word_embeddings": True,
    },
    "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27},
}
QWEN2_7B = {
    "_name_or_path": "Qwen/Qwen2-7B",
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
MPT_7B = {
    "_name_or_path": "mosaicml/mpt-7b",
    "architectures": ["MPTForCausalLM"],
    "model_type": "mpt",
    "d_model": 4096,
    "n_heads": 32,
    "n_layers": 32,
    "expansion_ratio": 4,
    "attn_config": {"alibi": True, "attn_impl": "torch"},
    "vocab_size": 50432,
}
DEEPSEEK_V2_LITE = {  # multi-head latent attention: one 512 + 64 latent per token and layer
    "_name_or_path": "deepseek-ai/DeepSeek-V2-Lite",
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_hidden_layers": 27,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "vocab_size": 102400,
}

# (config, (layers, KV heads, head size), published parameters, active parameters)
FAMILIES = {
    "opt-125m": (OPT_125M, (12, 12, 64), 125e6, None),
    "gpt2": (GPT2, (12, 12, 64), 124e6, None),
    "falcon-7b": (FALCON_7B, (32, 1, 64), 6.92e9, None),
    "falcon-40b (RW)": (FALCON_40B_RW, (60, 8, 64), None, None),
    "mixtral-8x7b": (MIXTRAL_8X7B, (32, 8, 128), 46.7e9, 12.9e9),
    "gemma-3-12b": (GEMMA3_12B, (48, 8, 256), 11.77e9, None),  # the text model's
    "qwen2-7b": (QWEN2_7B, (28, 4, 128), 7.62e9, None),
    "mpt-7b": (MPT_7B, (32, 32, 128), 6.7e9, None),
    "deepseek-v2-lite": (DEEPSEEK_V2_LITE, (27, 1, 576), None, None),
}


@pytest.fixture
def warnings_logged(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """The warnings of ``continuum_tiered.core.model_shapes``, also once vLLM's plugin has sent our
    loggers to its own handlers (they no longer propagate to pytest's)."""
    logger = logging.getLogger("continuum_tiered.core.model_shapes")
    logger.addHandler(caplog.handler)
    model_shapes._warned.clear()  # each field is warned about once per process
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_its_kv_shape_and_an_estimate(family):
    config, shape, total, active = FAMILIES[family]
    model = ModelShape.from_hf_config(config)
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == shape
    if total is not None:
        assert parameter_count(config) == pytest.approx(total, rel=0.03)
    if active is not None:
        assert active_parameter_count(config) == pytest.approx(active, rel=0.03)
    profile = estimated_profile(config, model, "cuda")
    c0, c1, c2 = profile.prefill_coeffs
    assert c1 == pytest.approx(
        2 * active_parameter_count(config) / ROOFLINES["cuda"].effective_flops
    )
    assert c0 > 0 and c2 > 0
    assert profile.prefill_time(8192) > profile.prefill_time(1024) > 0


def test_a_missing_field_is_assumed_with_a_warning_naming_it_and_the_value(warnings_logged):
    config, _, _, _ = FAMILIES["gpt2"]
    estimated_profile(config, ModelShape.from_hf_config(config), "cpu")
    assert "no intermediate_size / ffn_dim / n_inner / ffn_hidden_size" in warnings_logged.text
    assert "assuming intermediate_size = 3072" in warnings_logged.text


def test_a_config_with_no_known_field_still_gives_an_estimate(warnings_logged):
    config = {"_name_or_path": "exotic/model", "model_type": "exotic", "layers": "many"}
    shape = ModelShape.from_hf_config(config)
    profile = estimated_profile(config, shape, "cpu")
    assert shape.num_layers == 32 and profile.prefill_time(1000) > 0
    for assumed in ("num_hidden_layers = 32", "hidden_size = 4096", "vocab_size = 32000"):
        assert assumed in warnings_logged.text
    assert "exotic/model" in warnings_logged.text


def test_mixture_of_experts_prices_only_the_routed_experts():
    dense_equivalent = {**MIXTRAL_8X7B, "num_local_experts": 0}
    assert active_parameter_count(MIXTRAL_8X7B) < parameter_count(MIXTRAL_8X7B)
    assert active_parameter_count(MIXTRAL_8X7B) > parameter_count(dense_equivalent)


# ------------------------------------------------------- vLLM's Scheduler on a tiny OPT

TINY_OPT = {  # vLLM's CPU build: head_dim 128 / 2 = 64, the smallest it takes
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "activation_function": "relu",
    "hidden_size": 128,
    "ffn_dim": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "word_embed_proj_dim": 128,
    "do_layer_norm_before": True,
    "max_position_embeddings": 2048,
    "vocab_size": 512,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
}


def test_vllms_scheduler_starts_with_the_connector_on_an_opt_model(tmp_path: Path):
    from continuum_tiered.sim.scheduler_driver import (
        DriverConfig,
        SchedulerDriver,
        build_vllm_config,
    )

    (tmp_path / "config.json").write_text(json.dumps(TINY_OPT))
    cfg = DriverConfig(
        model_dir=tmp_path,
        num_blocks=40,
        block_size=32,
        max_model_len=1024,
        kv_transfer_config={"kv_connector": "ContinuumConnector", "kv_role": "kv_both"},
    )
    driver = SchedulerDriver(cfg, build_vllm_config(cfg))  # raised KeyError before
    connector = driver.connector
    profile = connector.options.profile  # estimated: no profile was given
    assert (profile.model.num_layers, profile.model.num_kv_heads, profile.model.head_dim) == (
        2,
        2,
        64,
    )
    flops = ROOFLINES["cpu"].effective_flops
    assert profile.prefill_coeffs[1] == pytest.approx(2 * parameter_count(TINY_OPT) / flops)
    # The estimate prices a prefill of this tiny model at microseconds, so the default
    # policy would not pin: a fixed TTL shows the connector pinning on OPT's blocks.
    connector.policy = StaticTTLPolicy(100.0)
    prompt = list(range(3, 3 + 320))
    hints = ProgramHints("opt-program", 0).to_params()
    driver.add_request("a0", prompt, 2, connector.tiers.now(), kv_transfer_params=hints)
    for _ in range(50):
        if "a0" in driver.step().finished_request_ids:
            break
    else:
        pytest.fail("the request did not finish")
    pin = connector.pins.get("opt-program")
    assert pin is not None and pin.num_blocks == 10
    connector.pins.release_all(ReleaseReason.SHUTDOWN)
