import copy
import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from continuum_tiered.core.profile import (
    PROFILE_VERSION,
    EngineSteps,
    ModelShape,
    ProfileError,
    ProfileMismatchError,
    Tier,
    TierProfile,
    builtin_profile_names,
    default_profile,
    fit_quadratic,
    load_named_profile,
)
from continuum_tiered.core.profile_source import resolve_profile

LLAMA_8B = ModelShape("llama-8b", num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2)


def _profile() -> TierProfile:
    return TierProfile(
        version=PROFILE_VERSION,
        model=LLAMA_8B,
        device="cuda",
        tiers={"cpu": Tier("cpu", 25e9, 20e-6), "disk": Tier("disk", 2e9, 1e-4)},
        prefill_coeffs=(0.01, 4e-5, 6.5e-10),
        source="unit test",
    )


def test_kv_bytes_per_token() -> None:
    assert LLAMA_8B.kv_bytes_per_token == 131072


def test_from_hf_config() -> None:
    config = {
        "_name_or_path": "meta-llama/Llama-3.1-8B",
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
    }
    shape = ModelShape.from_hf_config(config)
    assert shape == ModelShape("meta-llama/Llama-3.1-8B", 32, 8, 128, 2)
    mha = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128, "head_dim": 64}
    assert ModelShape.from_hf_config(mha, dtype_bytes=4, name="tiny") == ModelShape(
        "tiny", 2, 2, 64, 4
    )
    nested = {"model_type": "gemma3", "text_config": config}
    assert ModelShape.from_hf_config(nested).num_kv_heads == 8


@pytest.mark.parametrize(
    ("key", "assumed"),
    [("num_hidden_layers", "num_hidden_layers = 32"), ("hidden_size", "hidden_size = 4096")],
)
def test_from_hf_config_assumes_a_missing_key_and_warns_naming_it(key, assumed, caplog) -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128}
    del config[key]
    # vLLM's plugin, once loaded in this process, sends our records to its own handlers.
    logger = logging.getLogger("continuum_tiered.core.model_shapes")
    logger.addHandler(caplog.handler)
    try:
        shape = ModelShape.from_hf_config(config, name=f"no-{key}")
    finally:
        logger.removeHandler(caplog.handler)
    assert assumed in caplog.text and f"no-{key}" in caplog.text
    assert shape.num_layers == (32 if key == "num_hidden_layers" else 2)


def test_costs() -> None:
    profile = _profile()
    n = 20_000
    assert profile.prefill_time(n) == pytest.approx(0.01 + 4e-5 * n + 6.5e-10 * n * n)
    assert profile.prefill_time(0) == 0.0
    assert profile.reload_time("cpu", n) == pytest.approx(20e-6 + n * 131072 / 25e9)
    assert profile.reload_or_prefill(n, None) == profile.prefill_time(n)
    assert profile.reload_or_prefill(n, "cpu") == profile.reload_time("cpu", n)
    slow = dataclasses.replace(profile, tiers={"nfs": Tier("nfs", 1e6, 0.0)})
    assert slow.reload_or_prefill(n, "nfs") == slow.prefill_time(n)
    with pytest.raises(ProfileError, match=r"'gpu'.*cpu, disk"):
        profile.reload_time("gpu", n)


def test_a_remote_tier_is_a_tier_like_the_others(tmp_path: Path) -> None:
    """Redis behind the local tiers: stored, loaded back with its figures and provenance,
    and priced (a 20k-token reload at 5 GB/s beats the prefill)."""
    remote = Tier("remote", 5e9, 3e-4, write_bandwidth_bytes_per_s=4e9)
    profile = dataclasses.replace(_profile(), tiers={**_profile().tiers, "remote": remote})
    profile = dataclasses.replace(profile, provenance={"tiers.remote.latency_s": "measured"})
    profile.save(tmp_path / "p.json")
    assert TierProfile.load(tmp_path / "p.json") == profile
    n = 20_000
    assert profile.reload_or_prefill(n, "remote") == pytest.approx(3e-4 + n * 131072 / 5e9)
    assert (
        profile.reload_time("cpu", n) < profile.reload_time("remote", n) < profile.prefill_time(n)
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    assert TierProfile.load(path) == _profile()
    assert TierProfile.load(path, expect_model=LLAMA_8B, expect_device="cuda") == _profile()


def _mutated(path: Path, edit: object) -> Path:
    data = _profile().to_json()
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _set(keys: tuple[str, ...], value: object):
    def edit(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return edit


def _delete(keys: tuple[str, ...]):
    def edit(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(("version",), 2), r"\$\.version"),
        (_set(("version",), True), r"\$\.version"),
        (_delete(("model",)), r"\$\.model: missing"),
        (_delete(("model", "head_dim")), r"\$\.model\.head_dim: missing"),
        (_set(("model", "num_layers"), "32"), r"\$\.model\.num_layers"),
        (_set(("model", "num_kv_heads"), 0), r"\$\.model\.num_kv_heads"),
        (_set(("model", "dtype_bytes"), 2.0), r"\$\.model\.dtype_bytes"),
        (_set(("device",), ""), r"\$\.device"),
        (_set(("tiers",), []), r"\$\.tiers"),
        (_set(("tiers", "cpu", "bandwidth_bytes_per_s"), 0), r"cpu\.bandwidth_bytes_per_s.*> 0"),
        (_set(("tiers", "cpu", "bandwidth_bytes_per_s"), "fast"), r"cpu\.bandwidth_bytes_per_s"),
        (_set(("tiers", "disk", "latency_s"), -1e-6), r"disk\.latency_s.*>= 0"),
        (_delete(("tiers", "disk", "latency_s")), r"disk\.latency_s: missing"),
        (_set(("prefill_coeffs",), [0.0, 1e-5]), r"\$\.prefill_coeffs"),
        (_set(("prefill_coeffs",), [0.0, 1e-5, None]), r"\$\.prefill_coeffs\[2\]"),
        (_set(("prefill_coeffs",), [-0.1, 1e-5, 0.0]), r"negative at n = 1\b"),
        (_set(("prefill_coeffs",), [0.0, 1e-5, -1e-10]), r"negative at n = 1000000"),
        (_set(("prefill_coeffs",), [1.0, -2e-3, 1e-9]), r"negative at n = 1000000\b"),
        (_set(("prefill_coeffs",), [0.2, -2e-3, 1e-8]), r"negative at n = 100000\b"),
        (_set(("source",), 3), r"\$\.source"),
        (
            _set(("tiers", "cpu", "write_bandwidth_bytes_per_s"), 0.0),
            r"\$\.tiers\.cpu\.write_bandwidth_bytes_per_s: must be > 0",
        ),
        (
            _set(("tiers", "disk", "duplex_bandwidth_bytes_per_s"), float("inf")),
            r"\$\.tiers\.disk\.duplex_bandwidth_bytes_per_s: got inf, expected a finite",
        ),
        (
            _set(("tiers", "disk", "write_bandwidth_bytes_per_s"), "1e9"),
            r"\$\.tiers\.disk\.write_bandwidth_bytes_per_s: got '1e9'",
        ),
        (_set(("host_memcpy_bytes_per_s",), -1e9), r"\$\.host_memcpy_bytes_per_s: must be > 0"),
        (_set(("host_memcpy_bytes_per_s",), True), r"\$\.host_memcpy_bytes_per_s: got True"),
        (_set(("provenance",), ["measured"]), r"\$\.provenance: got .*expected an object"),
        (
            _set(("provenance",), {"prefill_coeffs": "guessed"}),
            r"\$\.provenance\.prefill_coeffs: got 'guessed', expected one of published, "
            "measured, assumed, derived",
        ),
        (
            _set(("provenance",), {"tiers.cpu.write_bandwidth_bytes_per_s": "measured"}),
            r"\$\.provenance\.tiers\.cpu\.write_bandwidth_bytes_per_s: names no figure",
        ),
        (
            _set(("provenance",), {"decode_coeffs": "measured"}),
            r"\$\.provenance\.decode_coeffs: names no figure of this profile; its figures: "
            r"prefill_coeffs, tiers\.cpu\.bandwidth_bytes_per_s",
        ),
    ],
)
def test_load_validation(tmp_path: Path, edit: object, message: str) -> None:
    path = _mutated(tmp_path / "bad.json", edit)
    with pytest.raises(ProfileError, match=message) as info:
        TierProfile.load(path)
    assert str(path) in str(info.value)


def test_load_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        TierProfile.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read"):
        TierProfile.load(tmp_path / "x.json")


def test_wrong_model_and_device(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    renamed = ModelShape("other-name", 32, 8, 128, 2)
    assert TierProfile.load(path, expect_model=renamed).model == LLAMA_8B
    tiny = ModelShape("tiny", 2, 1, 64, 2)
    with pytest.raises(ProfileError) as info:
        TierProfile.load(path, expect_model=tiny)
    assert str(info.value) == (
        f"profile {path} was measured for model llama-8b (shape layers=32, kv_heads=8, "
        "head_dim=128, dtype_bytes=2) but the server runs tiny (shape layers=2, kv_heads=1, "
        "head_dim=64, dtype_bytes=2)"
    )
    with pytest.raises(ProfileError, match=r"measured on device 'cuda'.*'cpu'"):
        TierProfile.load(path, expect_device="cpu")
    with pytest.raises(ProfileError, match=f"profile {path} was measured for model llama-8b"):
        load_named_profile(str(path), expect_model=tiny)


def test_from_json_checks_the_target() -> None:
    data = _profile().to_json()
    assert TierProfile.from_json(data, expect_model=LLAMA_8B, expect_device="cuda") == _profile()
    with pytest.raises(ProfileError, match=r"^profile was measured for model llama-8b"):
        TierProfile.from_json(data, expect_model=ModelShape("x", 32, 8, 128, 4))
    with pytest.raises(ProfileError, match="server runs on 'cpu'"):
        TierProfile.from_json(data, expect_device="cpu")


@given(
    c0=st.floats(0, 1),
    c1=st.floats(1e-7, 1e-3),
    c2=st.floats(0, 1e-8),
    ns=st.lists(st.integers(1, 1_000_000), min_size=3, max_size=20, unique=True),
)
def test_fit_quadratic_reproduces_exact_points(
    c0: float, c1: float, c2: float, ns: list[int]
) -> None:
    ts = [c0 + c1 * n + c2 * n * n for n in ns]
    f0, f1, f2 = fit_quadratic(ns, ts)
    for n, t in zip(ns, ts, strict=True):
        assert f0 + f1 * n + f2 * n * n == pytest.approx(t, rel=1e-9)


def test_fit_quadratic_is_least_squares() -> None:
    # Least squares <=> the residuals are orthogonal to 1, n and n^2.
    rng = random.Random(7)
    ns = [rng.randint(100, 100_000) for _ in range(40)]
    ts = [0.02 + 4e-5 * n + 6e-10 * n * n + rng.gauss(0, 0.05) for n in ns]
    f0, f1, f2 = fit_quadratic(ns, ts)
    residuals = [t - (f0 + f1 * n + f2 * n * n) for n, t in zip(ns, ts, strict=True)]
    for k in range(3):
        scale = math.fsum(abs(t) * (n / 1e5) ** k for n, t in zip(ns, ts, strict=True))
        dot = math.fsum(r * (n / 1e5) ** k for n, r in zip(ns, residuals, strict=True))
        assert abs(dot) < 1e-9 * scale
    assert max(map(abs, residuals)) > 0.01  # the noise is really there


def test_fit_quadratic_needs_three_lengths() -> None:
    with pytest.raises(ProfileError, match="3 distinct"):
        fit_quadratic([1, 1, 2], [1.0, 1.0, 2.0])
    with pytest.raises(ProfileError):
        fit_quadratic([1, 2, 3], [1.0])


def test_builtin_profiles() -> None:
    assert {"h100-llama-3.1-8b", "cpu-tiny-llama"} <= set(builtin_profile_names())
    h100 = load_named_profile("h100-llama-3.1-8b")
    assert h100.device == "cuda"
    assert h100.model.kv_bytes_per_token == 131072
    assert set(h100.tiers) == {"cpu", "disk"}
    assert "aiconfigurator-core" in h100.source
    # 20k tokens: prefill ~0.53 s; reload from CPU (64 GB/s) ~0.04 s, the cheaper.
    assert h100.prefill_time(20_000) == pytest.approx(0.52635106)
    assert h100.reload_or_prefill(20_000, "cpu") == pytest.approx(0.04098)
    assert default_profile("cuda") == h100
    tiny = default_profile()
    assert (tiny.device, tiny.model.num_layers, tiny.model.head_dim) == ("cpu", 2, 64)


def test_load_named_profile_by_path_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    _profile().save(path)
    assert load_named_profile(str(path)) == _profile()
    with pytest.raises(ProfileError, match=r"h100-llama-3\.1-8b"):
        load_named_profile("a100-nope")
    with pytest.raises(ProfileError, match="cpu, cuda"):
        default_profile("tpu")


def test_to_json_is_plain_json() -> None:
    data = _profile().to_json()
    assert json.loads(json.dumps(data)) == copy.deepcopy(data)
    assert TierProfile.from_json(data) == _profile()


DECODE = (0.004, 2e-4, 3e-9)


def test_decode_step_time() -> None:
    profile = dataclasses.replace(_profile(), decode_coeffs=DECODE)
    assert profile.decode_step_time(8, 20_000) == pytest.approx(
        0.004 + 8 * 2e-4 + 8 * 20_000 * 3e-9
    )
    assert profile.decode_step_time(1, 0) == pytest.approx(0.004 + 2e-4)
    for batch, context in ((0, 100), (4, -1)):
        with pytest.raises(ProfileError, match="batch >= 1 and context_tokens >= 0"):
            profile.decode_step_time(batch, context)


def test_decode_step_time_without_coeffs() -> None:
    assert _profile().decode_coeffs is None
    with pytest.raises(ProfileError, match="no decode_coeffs"):
        _profile().decode_step_time(1, 1000)


def test_decode_coeffs_round_trip(tmp_path: Path) -> None:
    assert "decode_coeffs" not in _profile().to_json()  # version 1 files stay as they were
    profile = dataclasses.replace(_profile(), decode_coeffs=DECODE)
    assert profile.to_json()["decode_coeffs"] == list(DECODE)
    profile.save(tmp_path / "p.json")
    assert TierProfile.load(tmp_path / "p.json") == profile
    null = {**_profile().to_json(), "decode_coeffs": None}
    assert TierProfile.from_json(null).decode_coeffs is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([0.0, 1e-4], r"\$\.decode_coeffs: got .*expected \[d0, d1, d2\]"),
        ({"d0": 0.0}, r"\$\.decode_coeffs: got .*expected a list"),
        ([0.0, "1e-4", 0.0], r"\$\.decode_coeffs\[1\]: got '1e-4'"),
        ([0.0, 1e-4, float("nan")], r"\$\.decode_coeffs\[2\]"),
        ([-1e-3, 1e-4, 1e-9], r"\$\.decode_coeffs\[0\]: must be >= 0"),
        ([1e-3, 1e-4, -1e-9], r"\$\.decode_coeffs\[2\]: must be >= 0"),
    ],
)
def test_decode_coeffs_validation(value: object, message: str) -> None:
    data = {**_profile().to_json(), "decode_coeffs": value}
    with pytest.raises(ProfileError, match=message):
        TierProfile.from_json(data)


ENGINE = EngineSteps(prefill_coeffs=(0.007, 1e-4, 4e-9), decode_coeffs=(0.006, 1e-4, 1e-6))


def test_engine_steps_round_trip(tmp_path: Path) -> None:
    assert "engine" not in _profile().to_json()  # files without it stay as they were
    profile = dataclasses.replace(_profile(), engine=ENGINE)
    assert profile.to_json()["engine"] == {
        "prefill_coeffs": [0.007, 1e-4, 4e-9],
        "decode_coeffs": [0.006, 1e-4, 1e-6],
    }
    profile.save(tmp_path / "p.json")
    assert TierProfile.load(tmp_path / "p.json") == profile
    assert TierProfile.from_json({**_profile().to_json(), "engine": None}).engine is None
    assert ENGINE.prefill_time(1000) == pytest.approx(0.007 + 0.1 + 4e-3)
    assert ENGINE.decode_step_time(4, 1000) == pytest.approx(0.006 + 4e-4 + 4e-3)


def test_engine_request_overhead_round_trip(tmp_path: Path) -> None:
    """The measured round trip outside engine steps is kept; files without it read as 0."""
    assert ENGINE.request_overhead_s == 0.0
    assert "request_overhead_s" not in ENGINE.to_json()
    engine = dataclasses.replace(ENGINE, request_overhead_s=0.05)
    profile = dataclasses.replace(_profile(), engine=engine)
    assert profile.to_json()["engine"]["request_overhead_s"] == 0.05
    profile.save(tmp_path / "p.json")
    assert TierProfile.load(tmp_path / "p.json").engine == engine


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ([0.0], r"\$\.engine: got .*expected an object"),
        ({"decode_coeffs": [0, 0, 0]}, r"\$\.engine\.prefill_coeffs: missing"),
        ({"prefill_coeffs": [0, 0, 0]}, r"\$\.engine\.decode_coeffs: missing"),
        (
            {"prefill_coeffs": [-1.0, 0, 0], "decode_coeffs": [0, 0, 0]},
            r"\$\.engine\.prefill_coeffs: .*negative at n = 1\b",
        ),
        (
            {"prefill_coeffs": [0, 0, 0], "decode_coeffs": [0, -1e-4, 0]},
            r"\$\.engine\.decode_coeffs\[1\]: must be >= 0",
        ),
        (
            {"prefill_coeffs": [0, 0, 0], "decode_coeffs": None},
            r"\$\.engine\.decode_coeffs: got None",
        ),
        (
            {"prefill_coeffs": [0, 0, 0], "decode_coeffs": [0, 0, 0], "request_overhead_s": "1"},
            r"\$\.engine\.request_overhead_s: got '1', expected a finite number",
        ),
        (
            {"prefill_coeffs": [0, 0, 0], "decode_coeffs": [0, 0, 0], "request_overhead_s": -0.1},
            r"\$\.engine\.request_overhead_s: must be >= 0",
        ),
    ],
)
def test_engine_steps_validation(engine: object, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        TierProfile.from_json({**_profile().to_json(), "engine": engine})


CONTENDED = {
    "cpu": Tier("cpu", 64e9, 20e-6, 60e9, 51.2e9),
    "disk": Tier("disk", 2e9, 1e-4, write_bandwidth_bytes_per_s=1.5e9),
}


def test_tier_write_and_duplex_fall_back_to_the_one_direction_figures() -> None:
    plain = Tier("disk", 2e9, 1e-4)
    assert (plain.write_bandwidth, plain.duplex_bandwidth, plain.duplex_write_bandwidth) == (
        2e9,
        2e9,
        2e9,
    )
    assert plain.write_time(1e9) == plain.transfer_time(1e9) == pytest.approx(0.5001)
    cpu, disk = CONTENDED["cpu"], CONTENDED["disk"]
    assert cpu.write_time(6e9) == pytest.approx(20e-6 + 0.1)
    assert (cpu.duplex_bandwidth, cpu.duplex_write_bandwidth) == (51.2e9, 51.2e9)
    assert (disk.write_bandwidth, disk.duplex_bandwidth, disk.duplex_write_bandwidth) == (
        1.5e9,
        2e9,
        1.5e9,
    )
    # A measured duplex figure above a one-direction one is no speed-up under contention.
    fast = Tier("disk", 2e9, 0.0, 1e9, 1.5e9)
    assert (fast.duplex_bandwidth, fast.duplex_write_bandwidth) == (1.5e9, 1e9)


def _contended_profile() -> TierProfile:
    return dataclasses.replace(
        _profile(),
        tiers=CONTENDED,
        decode_coeffs=DECODE,
        engine=ENGINE,
        host_memcpy_bytes_per_s=10e9,
        provenance={
            "tiers.cpu.bandwidth_bytes_per_s": "published",
            "tiers.cpu.duplex_bandwidth_bytes_per_s": "assumed",
            "tiers.disk.write_bandwidth_bytes_per_s": "measured",
            "host_memcpy_bytes_per_s": "assumed",
            "prefill_coeffs": "derived",
            "engine.decode_coeffs": "measured",
        },
    )


def test_write_duplex_memcpy_and_provenance_round_trip(tmp_path: Path) -> None:
    profile = _contended_profile()
    data = profile.to_json()
    assert data["tiers"]["cpu"] == {
        "bandwidth_bytes_per_s": 64e9,
        "latency_s": 20e-6,
        "write_bandwidth_bytes_per_s": 60e9,
        "duplex_bandwidth_bytes_per_s": 51.2e9,
    }
    assert "duplex_bandwidth_bytes_per_s" not in data["tiers"]["disk"]
    assert data["host_memcpy_bytes_per_s"] == 10e9
    assert data["provenance"]["prefill_coeffs"] == "derived"
    profile.save(tmp_path / "p.json")
    assert TierProfile.load(tmp_path / "p.json") == profile
    assert TierProfile.from_json(json.loads(json.dumps(data))) == profile


def test_files_without_the_new_fields_stay_as_they_were() -> None:
    data = _profile().to_json()
    assert set(data) == {"version", "model", "device", "tiers", "prefill_coeffs", "source"}
    assert set(data["tiers"]["cpu"]) == {"bandwidth_bytes_per_s", "latency_s"}
    nulls = {**data, "host_memcpy_bytes_per_s": None, "provenance": None}
    nulls["tiers"] = {
        name: {**tier, "write_bandwidth_bytes_per_s": None, "duplex_bandwidth_bytes_per_s": None}
        for name, tier in data["tiers"].items()
    }
    assert TierProfile.from_json(nulls) == _profile()


def test_figure_paths_name_every_figure_present() -> None:
    assert _profile().figure_paths() == [
        "tiers.cpu.bandwidth_bytes_per_s",
        "tiers.cpu.latency_s",
        "tiers.disk.bandwidth_bytes_per_s",
        "tiers.disk.latency_s",
        "prefill_coeffs",
    ]
    overhead = dataclasses.replace(ENGINE, request_overhead_s=0.05)
    paths = dataclasses.replace(_contended_profile(), engine=overhead).figure_paths()
    assert {
        "tiers.cpu.write_bandwidth_bytes_per_s",
        "tiers.cpu.duplex_bandwidth_bytes_per_s",
        "tiers.disk.write_bandwidth_bytes_per_s",
        "host_memcpy_bytes_per_s",
        "decode_coeffs",
        "engine.prefill_coeffs",
        "engine.decode_coeffs",
        "engine.request_overhead_s",
    } <= set(paths)
    assert "tiers.disk.duplex_bandwidth_bytes_per_s" not in paths


@pytest.mark.parametrize("name", builtin_profile_names())
def test_builtin_profiles_state_a_provenance_for_every_figure(name: str) -> None:
    profile = load_named_profile(name)
    assert sorted(profile.provenance) == sorted(profile.figure_paths())


def test_a_replaced_tier_drops_the_provenance_of_figures_it_lacks(tmp_path: Path) -> None:
    """As tests and experiments do: swap a tier for a plain one, save, load."""
    profile = _contended_profile()
    slow = dataclasses.replace(profile, tiers={**profile.tiers, "disk": Tier("disk", 1e3, 0.0)})
    slow.save(tmp_path / "slow.json")
    loaded = TierProfile.load(tmp_path / "slow.json")
    assert loaded.tiers["disk"] == Tier("disk", 1e3, 0.0)
    assert "tiers.disk.write_bandwidth_bytes_per_s" not in loaded.provenance
    assert loaded.provenance["tiers.cpu.bandwidth_bytes_per_s"] == "published"


LLAMA_8B_CONFIG = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}


@pytest.mark.parametrize("form", ["path", "json"])
def test_resolve_profile_loads_a_profile_of_the_served_shape(tmp_path: Path, form: str) -> None:
    path = tmp_path / "p.json"
    _profile().save(path)
    ref = str(path) if form == "path" else _profile().to_json()
    resolved = resolve_profile(ref, LLAMA_8B_CONFIG, name="served-8b", device="cuda")
    assert resolved == _profile()


@pytest.mark.parametrize(
    ("config", "dtype_bytes", "served"),
    [
        ({**LLAMA_8B_CONFIG, "num_hidden_layers": 80}, 2, "layers=80, kv_heads=8"),
        ({**LLAMA_8B_CONFIG, "num_key_value_heads": 2}, 2, "layers=32, kv_heads=2"),
        ({**LLAMA_8B_CONFIG, "head_dim": 64}, 2, "head_dim=64, dtype_bytes=2"),
        (LLAMA_8B_CONFIG, 4, "head_dim=128, dtype_bytes=4"),
    ],
)
def test_resolve_profile_refuses_another_shape_naming_both(
    config: dict[str, int], dtype_bytes: int, served: str
) -> None:
    with pytest.raises(ProfileMismatchError) as info:
        resolve_profile(_profile().to_json(), config, name="served", dtype_bytes=dtype_bytes)
    message = str(info.value)
    assert "model llama-8b (shape layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)" in message
    assert served in message.split("runs served (shape ")[1]
    assert isinstance(info.value, ValueError)  # the CLI's exit 2


def test_resolve_profile_checks_the_device_only_when_given() -> None:
    data = _profile().to_json()
    assert resolve_profile(data, LLAMA_8B_CONFIG).device == "cuda"
    with pytest.raises(ProfileError, match="measured on device 'cuda'"):
        resolve_profile(data, LLAMA_8B_CONFIG, device="cpu")


def test_resolve_profile_estimates_without_a_profile() -> None:
    estimate = resolve_profile(None, LLAMA_8B_CONFIG, name="served-8b", device="cuda")
    assert estimate.model == ModelShape("served-8b", 32, 8, 128, 2)
    assert estimate.source.startswith("roofline estimate")
    with pytest.raises(ValueError, match="needs the device"):
        resolve_profile(None, LLAMA_8B_CONFIG)
