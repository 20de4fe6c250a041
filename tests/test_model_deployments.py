"""The Gemma 3 12B and GLM-4.5 deployments, and the virtual engine's hybrid KV cache manager.

vLLM builds its config from each deployment's config.json (no weights); the replay's KV
cache config is vLLM's own grouping of the model's layers: with the hybrid manager (HMA)
Gemma 3's sliding-window layers get their own groups, so the same memory holds six times
the blocks; LMCache's peers run with it off, as its connector does not support it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from continuum_tiered.core.deployment import MODEL_SHAPES, Deployment
from continuum_tiered.core.profile import ModelShape, load_named_profile
from continuum_tiered.sim.lmcache_model import register as register_lmcache_model
from continuum_tiered.sim.peers import PEERS, get_peer
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.sim.simulate import ReplaySetup, driver_config, replay
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals

NEW_MODELS = ("gemma-3-12b", "glm-4.5-355b-ep8")


def _driver(model: str, tmp_path: Path, hybrid: bool) -> SchedulerDriver:
    d = Deployment(model=model)
    overrides = {} if hybrid else {"disable_hybrid_kv_cache_manager": True}
    cfg = DriverConfig(
        model_dir=d.write_config(tmp_path / model),
        num_blocks=d.num_gpu_blocks(),
        block_size=d.block_size,
        max_model_len=4096,
        engine_overrides=overrides,
        log_stats=False,
    )
    return SchedulerDriver(cfg, build_vllm_config(cfg))


@pytest.mark.parametrize("model", NEW_MODELS)
def test_vllm_builds_the_model_config(model: str, tmp_path: Path) -> None:
    d = Deployment(model=model)
    args = EngineArgs(
        model=str(d.write_config(tmp_path)),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=4096,
    )
    config = args.create_engine_config()
    assert config.model_config.architectures == MODEL_SHAPES[model]["architectures"]
    text = config.model_config.hf_text_config
    assert text.num_hidden_layers == MODEL_SHAPES[model]["num_hidden_layers"]


def test_deployments_fit_with_a_sensible_kv_pool() -> None:
    gemma, glm = Deployment(model="gemma-3-12b"), Deployment(model="glm-4.5-355b-ep8")
    assert gemma.gpu_memory_bytes == 80e9 and glm.gpu_memory_bytes == 141e9
    assert 20e9 < gemma.weight_bytes() < 27e9  # 12B parameters in bf16
    assert 80e9 < glm.weight_bytes() < 95e9  # an eighth of 355B, the vocabulary whole
    assert gemma.kv_bytes_per_token() == 48 * 2 * 8 * 256 * 2
    assert glm.kv_bytes_per_token() == 92 * 2 * 1 * 128 * 2
    for d, low, high in ((gemma, 80_000, 200_000), (glm, 400_000, 1_000_000)):
        tokens = d.num_gpu_blocks() * d.block_size
        assert low < tokens < high


def test_llama_pool_unchanged(tmp_path: Path) -> None:
    """One full-attention group of exactly the deployment's blocks, HMA on or off."""
    d = Deployment(model="llama-3.1-8b")
    assert d.num_gpu_blocks() == 24766
    assert Deployment(model="llama-3.1-70b-tp4").num_gpu_blocks() == 22561
    for hybrid in (True, False):
        kv = _driver("llama-3.1-8b", tmp_path, hybrid).kv_cache_config
        assert kv.num_blocks == 24766
        assert len(kv.kv_cache_groups) == 1
        assert len(kv.kv_cache_groups[0].layer_names) == 32


def test_gemma_groups_under_hma_and_capacity(tmp_path: Path) -> None:
    layer_types = MODEL_SHAPES["gemma-3-12b"]["layer_types"]
    on = _driver("gemma-3-12b", tmp_path, hybrid=True)
    off = _driver("gemma-3-12b", tmp_path, hybrid=False)
    assert not on.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    groups = on.kv_cache_config.kv_cache_groups
    by_kind = {"sliding_attention": SlidingWindowSpec, "full_attention": FullAttentionSpec}
    for group in groups:
        kinds = {layer_types[int(name.split(".")[2])] for name in group.layer_names}
        assert len(kinds) == 1  # a group holds one layer type
        assert type(group.kv_cache_spec) is by_kind[kinds.pop()]
        if isinstance(group.kv_cache_spec, SlidingWindowSpec):
            assert group.kv_cache_spec.sliding_window == 1024
    assert sum(len(g.layer_names) for g in groups) == 48
    sliding = sum(isinstance(g.kv_cache_spec, SlidingWindowSpec) for g in groups)
    assert (sliding, len(groups) - sliding) == (5, 1)  # 40 sliding and 8 full, 8 per group
    # HMA off: one group of every layer, the deployment's blocks exactly.
    [group] = off.kv_cache_config.kv_cache_groups
    assert len(group.layer_names) == 48
    assert off.kv_cache_config.num_blocks == Deployment(model="gemma-3-12b").num_gpu_blocks()
    # The same memory: a block holds 8 layers instead of 48, so six times as many.
    ratio = on.kv_cache_config.num_blocks / off.kv_cache_config.num_blocks
    assert ratio == pytest.approx(48 / 8, rel=1e-3)
    assert on.block_pool.num_gpu_blocks == on.kv_cache_config.num_blocks


def test_lmcache_peers_run_gemma_with_hma_off(tmp_path: Path) -> None:
    register_lmcache_model()
    setup = ReplaySetup(Deployment(model="gemma-3-12b"), "h100-gemma-3-12b")
    programs = load_named_trace("swebench", programs=2)
    profile = setup.profile()
    for name, peer in PEERS.items():
        cfg = driver_config(peer, setup, programs, profile)
        hma_off = cfg.engine_overrides.get("disable_hybrid_kv_cache_manager", False)
        assert hma_off == peer.lmcache, name
    for name, groups in (("tiered", 1), ("vllm", 6), ("continuum", 6)):
        cfg = driver_config(get_peer(name), setup, programs, profile)
        vllm_config = build_vllm_config(cfg)
        assert vllm_config.scheduler_config.disable_hybrid_kv_cache_manager == (groups == 1)
        driver = SchedulerDriver(cfg, vllm_config)
        assert len(driver.kv_cache_config.kv_cache_groups) == groups, name


@pytest.mark.parametrize("model", NEW_MODELS)
def test_profile_loads_for_the_deployment(model: str) -> None:
    hf = Deployment(model=model).hf_config()
    profile = load_named_profile(
        f"h100-{model}",
        expect_model=ModelShape.from_hf_config(hf, name=model),
        expect_device="cuda",
    )
    assert "Roofline estimate" in profile.source and "llama-3.1-8b: prefill" in profile.source
    assert profile.decode_coeffs is not None
    assert set(profile.tiers) == {"cpu", "disk"}
    assert 0.05 < profile.prefill_time(8192) < 2.0


@pytest.mark.parametrize("model", NEW_MODELS)
def test_tiny_replay_completes(model: str) -> None:
    programs = with_poisson_arrivals(load_named_trace("swebench", programs=2), 0.1, 0)
    setup = ReplaySetup(Deployment(model=model), f"h100-{model}")
    for name in ("vllm", "tiered"):
        summary, runs = replay(get_peer(name), programs, setup, 0.1)
        assert len(runs) == 2 and summary.avg_jct_s > 0, name
