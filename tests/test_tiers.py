"""``--tiers``: parsing, checks against this machine, and the connector config serve writes."""

from __future__ import annotations

import json
import math
import time

import pytest

from continuum_tiered.cli import main
from continuum_tiered.cluster.redis_server import RedisServer
from continuum_tiered.core.net import free_port
from continuum_tiered.core.remote_tier import CHECK_TIMEOUT_S
from continuum_tiered.vllm.serve import RESERVED_CPU_ENV, ServeOptions
from continuum_tiered.vllm.tiers import (
    DISK_SUBDIR,
    GIB,
    Tiers,
    TierSpecError,
    lmcache_tier_bytes,
)


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
    assert lmcache_tier_bytes(config) == {"cpu": 1.5 * GIB, "disk": 0.5 * GIB}
    assert lmcache_tier_bytes(Tiers.parse("cpu=1GB").lmcache_config()) == {"cpu": GIB}
    assert lmcache_tier_bytes({}) is None  # LMCache configured by its own file
    assert "lmcache.remote_url" not in config


def test_a_remote_tier_gives_lmcache_its_redis_url():
    with RedisServer() as redis_server:
        tiers = Tiers.parse(f"cpu=1GB,remote={redis_server.url}")
        tiers.check()
    config = tiers.lmcache_config()
    # The URL LMCache connects with bounds every Redis call (a frozen server stalls none).
    timeouts = "socket_connect_timeout=2&socket_timeout=5"
    assert config["lmcache.remote_url"] == f"{redis_server.url}?{timeouts}"
    own = Tiers.parse("cpu=1GB,remote=redis://h:1/2?socket_timeout=30").lmcache_config()
    assert own["lmcache.remote_url"] == "redis://h:1/2?socket_connect_timeout=2&socket_timeout=30"
    assert config["lmcache.remote_serde"] == "naive"
    # Redis bounds the shared tier, not this server: the scheduler's model takes it as unbounded.
    assert lmcache_tier_bytes(config) == {"cpu": GIB, "remote": math.inf}


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
        ("cpu=1GB,remote=http://127.0.0.1:6379", "scheme 'http'.*remote=redis://HOST:PORT"),
        ("cpu=1GB,remote=127.0.0.1:6379", "scheme"),
        ("cpu=1GB,remote=redis://:6379", "names no host"),
        ("cpu=1GB,remote=redis://127.0.0.1:port", "is not a URL"),
        ("cpu=1GB,remote=redis://a:1,remote=redis://b:2", "tier 'remote' given twice"),
        ("remote=redis://127.0.0.1:6379", "remote tier needs a cpu tier"),
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


def test_a_remote_tier_that_does_not_answer_fails_the_check_naming_it():
    closed = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TierSpecError, match=f"remote {closed} does not answer: .*refused"):
        Tiers.parse(f"cpu=1GB,remote={closed}").check()
    # A host that cannot be resolved: named too, and no long wait.
    started = time.monotonic()
    with pytest.raises(TierSpecError, match=r"remote redis://no-such-host\.invalid:6379 does not"):
        Tiers.parse("cpu=1GB,remote=redis://no-such-host.invalid:6379").check()
    assert time.monotonic() - started < 2 * CHECK_TIMEOUT_S


def test_serve_refuses_an_unreachable_remote_tier_before_starting_vllm(capsys):
    closed = f"redis://127.0.0.1:{free_port()}"
    assert main(["serve", "m", "--tiers", f"cpu=1GB,remote={closed}", "--dry-run"]) == 2
    assert f"remote {closed} does not answer" in capsys.readouterr().err


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
