"""``--tiers``: parsing, checks against this machine, and the connector config serve writes."""

from __future__ import annotations

import json

import pytest

from continuum_tiered.cli import main
from continuum_tiered.vllm.serve import RESERVED_CPU_ENV, ServeOptions
from continuum_tiered.vllm.tiers import DISK_SUBDIR, GIB, Tiers, TierSpecError, lmcache_tier_bytes


def test_a_full_spec_gives_lmcache_cpu_and_disk_settings(tmp_path):
    tiers = Tiers.parse(f"cpu=1.5GB,disk={tmp_path}:512MiB:cleanup")
    tiers.check()
    config = tiers.lmcache_config()
    assert config["lmcache.max_local_cpu_size"] == 1.5
    assert config["lmcache.local_disk"] == f"file://{tmp_path / DISK_SUBDIR}/"
    assert config["lmcache.max_local_disk_size"] == 0.5
    assert config["lmcache.save_decode_cache"] is True
    assert tiers.disk_cleanup
    # What the connector's scheduler reads back to model LMCache's tiers.
    assert lmcache_tier_bytes(config) == (1.5 * GIB, 0.5 * GIB)
    assert lmcache_tier_bytes(Tiers.parse("cpu=1GB").lmcache_config()) == (GIB, 0)
    assert lmcache_tier_bytes({}) is None  # LMCache configured by its own file


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("gpu=1GB", "unknown tier 'gpu'"),
        ("cpu=lots", "cpu size 'lots'"),
        ("cpu=0GB", "must be positive"),
        ("cpu=1GB,cpu=2GB", "given twice"),
        ("disk=/tmp:1GB", "needs a cpu tier"),
        ("cpu=1GB,disk=/tmp", "PATH:SIZE"),
        ("", "no tier"),
    ],
)
def test_bad_specs_name_the_problem(spec, problem):
    with pytest.raises(TierSpecError, match=problem):
        Tiers.parse(spec)


def test_sizes_beyond_this_machine_and_bad_paths_fail_the_check(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cases = [
        ("cpu=1000TB", "memory available"),
        (f"cpu=1GB,disk={tmp_path}:1000TB", "free on"),
        (f"cpu=1GB,disk={not_a_dir}:1GB", "is not a directory"),
        (f"cpu=1GB,disk={tmp_path / 'missing'}:1GB", "is not a directory"),
    ]
    for spec, problem in cases:
        with pytest.raises(TierSpecError, match=problem):
            Tiers.parse(spec).check()


def test_serve_composes_continuum_with_lmcache(tmp_path):
    tiers = Tiers.parse(f"cpu=1GB,disk={tmp_path}:1GB:cleanup")
    options = ServeOptions(model="m", policy="static-ttl", tiers=tiers)
    flags = options.vllm_flags()
    config = json.loads(flags[flags.index("--kv-transfer-config") + 1])
    assert config["kv_connector"] == "ContinuumTieredConnector"
    assert config["kv_load_failure_policy"] == "recompute"
    continuum, lmcache = config["kv_connector_extra_config"]["connectors"]
    assert continuum["kv_connector"] == "ContinuumConnector"
    assert continuum["kv_connector_extra_config"] == {"policy": "static-ttl"}
    assert lmcache["kv_connector"] == "LMCacheConnectorV1"
    assert lmcache["kv_connector_extra_config"]["lmcache.max_local_cpu_size"] == 1.0
    assert config["kv_connector_extra_config"]["disk_cleanup_dir"] == str(tmp_path / DISK_SUBDIR)
    assert "--disable-hybrid-kv-cache-manager" in flags


def test_serve_says_which_policy_runs_and_why(capsys):
    assert main(["serve", "m", "--tiers", "cpu=1GB", "--dry-run"]) == 0
    assert "retention policy: none (the default below LMCache's tiers" in capsys.readouterr().out
    assert main(["serve", "m", "--dry-run"]) == 0
    assert "retention policy: tiered (the default)" in capsys.readouterr().out
    assert main(["serve", "m", "--tiers", "cpu=1GB", "--policy", "tiered", "--dry-run"]) == 0
    assert "retention policy: tiered\n" in capsys.readouterr().out


def test_serve_refuses_a_bad_tier_before_starting_vllm(capsys):
    assert main(["serve", "m", "--tiers", f"cpu={1000 * 1024 * GIB}B", "--dry-run"]) == 2
    assert "memory available" in capsys.readouterr().err


def test_layerwise_loads_go_to_lmcache_and_are_refused_on_the_cpu_build(capsys):
    tiers = Tiers.parse("cpu=1GB")
    assert "lmcache.use_layerwise" not in tiers.lmcache_config()
    layerwise = ServeOptions("m", tiers=Tiers(cpu_bytes=GIB, layerwise=True))
    lmcache = layerwise.connector_config()["kv_connector_extra_config"]["connectors"][1]
    assert lmcache["kv_connector_extra_config"]["lmcache.use_layerwise"] is True
    assert main(["serve", "m", "--layerwise-loads", "--dry-run"]) == 2
    assert "needs --tiers" in capsys.readouterr().err
    assert main(["serve", "m", "--tiers", "cpu=1GB", "--layerwise-loads", "--dry-run"]) == 2
    assert "CPU build has none" in capsys.readouterr().err


def test_serve_on_the_cpu_build_leaves_out_the_connector_core(capsys, monkeypatch):
    """vLLM's CPU build reserves a second core for any KV connector; serve asks for one."""
    monkeypatch.delenv(RESERVED_CPU_ENV, raising=False)
    assert main(["serve", "m", "--dry-run"]) == 0
    assert f"{RESERVED_CPU_ENV}=1 vllm serve" in capsys.readouterr().out
    assert main(["serve", "m", "--dry-run", "--tensor-parallel-size", "2"]) == 0
    assert RESERVED_CPU_ENV not in capsys.readouterr().out  # several workers: vLLM decides
    monkeypatch.setenv(RESERVED_CPU_ENV, "0")
    assert main(["serve", "m", "--dry-run"]) == 0
    assert RESERVED_CPU_ENV not in capsys.readouterr().out  # the user's setting stands
