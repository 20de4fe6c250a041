"""Issue 14: hints from the sources the ecosystem already sends.

Besides our ``kv_transfer_params["continuum"]``, program hints come from vLLM's
``KvHintsEnvelope`` (``Request.kv_hints``) and from the public Continuum plugin's
``vllm_xargs`` keys (``SamplingParams.extra_args``); ``parse_hints`` reads the first source
present, in that order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from vllm import SamplingParams
from vllm.v1.kv_hints import KvHintAction, KvHintsEnvelope
from vllm.v1.request import Request

from continuum_tiered.core.hints import HintError, ProgramHints, parse_hints
from continuum_tiered.policies.static_ttl import StaticTTLPolicy
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.vllm.connectors.tier_link import NoTiers

OURS = {"continuum": {"program_id": "ours", "turn": 3, "last_turn": False, "tool": "grep"}}
XARGS = {"job_id": "job-7", "this_func_call": "pytest", "last_func_call": "ls"}


def envelope(*payloads: Any, action_type="continuum", version="1") -> KvHintsEnvelope:
    actions = [
        KvHintAction(f"a{i}", action_type, version, payload) for i, payload in enumerate(payloads)
    ]
    return KvHintsEnvelope(protocol_version="1", message_id="m0", actions=actions)


KV_HINTS = envelope({"program_id": "env", "turn": 2, "last_turn": True, "tool": "cat"})


# ------------------------------------------------------------------ vllm_xargs


def test_xargs_returning_turn():
    assert parse_hints(None, extra_args=XARGS) == ProgramHints("job-7", 1, False, "pytest")


@pytest.mark.parametrize("last_call", [None, "", "absent"])
def test_xargs_first_turn_has_turn_zero(last_call):
    args: dict[str, Any] = {"job_id": "j", "this_func_call": "bash"}
    if last_call != "absent":
        args["last_func_call"] = last_call
    assert parse_hints(None, extra_args=args) == ProgramHints("j", 0, False, "bash")


@pytest.mark.parametrize("value", [True, 1])  # the OpenAI server turns JSON true into 1
def test_xargs_last_step(value):
    hints = parse_hints(None, extra_args={"job_id": 42, "is_last_step": value})
    assert hints == ProgramHints("42", 0, True, None)  # integer job ids become strings


def test_xargs_without_continuum_keys_or_extra_args_give_none():
    assert parse_hints(None, extra_args={"session_id": "s", "other_plugin": 1}) is None
    assert parse_hints(None, extra_args=None) is None
    assert parse_hints(None) is None


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"this_func_call": "ls"}, "vllm_xargs.job_id"),  # a Continuum key but no job id
        ({"job_id": ""}, "vllm_xargs.job_id"),
        ({"job_id": 1.5}, "vllm_xargs.job_id"),
        ({"job_id": True}, "vllm_xargs.job_id"),
        ({"job_id": "x" * 257}, "vllm_xargs.job_id"),
        ({"job_id": "j", "this_func_call": "rm -rf /"}, "vllm_xargs.this_func_call"),
        ({"job_id": "j", "this_func_call": ["ls"]}, "vllm_xargs.this_func_call"),
        ({"job_id": "j", "last_func_call": 3}, "vllm_xargs.last_func_call"),
        ({"job_id": "j", "is_last_step": "yes"}, "vllm_xargs.is_last_step"),
        ({"job_id": "j", "is_last_step": 2}, "vllm_xargs.is_last_step"),
    ],
)
def test_malformed_xargs_name_their_field(args, field):
    with pytest.raises(HintError) as err:
        parse_hints(None, extra_args=args)
    assert err.value.field == field
    assert field in str(err.value)


# ------------------------------------------------------------------ kv_hints


def test_kv_hints_continuum_action():
    other = KvHintAction("x", "lmcache.evict", "2", {"anything": [1, 2]})
    env = KvHintsEnvelope("1", "m", [other, *KV_HINTS.actions])
    assert parse_hints(None, kv_hints=env) == ProgramHints("env", 2, True, "cat")


def test_kv_hints_without_continuum_action_give_none():
    assert parse_hints(None, kv_hints=envelope({"k": 1}, action_type="other")) is None
    assert parse_hints(None, kv_hints=KvHintsEnvelope("1", "m", [])) is None


@pytest.mark.parametrize(
    ("env", "field"),
    [
        (envelope({"program_id": "p", "turn": -1}), "kv_hints.actions[0].payload.turn"),
        (envelope({"program_id": "", "turn": 0}), "kv_hints.actions[0].payload.program_id"),
        (envelope({"program_id": "p", "turn": 0, "x": 1}), "kv_hints.actions[0].payload.x"),
        (envelope("not an object"), "kv_hints.actions[0].payload"),
        (
            envelope({"program_id": "p", "turn": 0}, version="2"),
            "kv_hints.actions[0].action_version",
        ),
        (
            envelope({"program_id": "p", "turn": 0}, {"program_id": "q", "turn": 0}),
            "kv_hints.actions[1]",
        ),
    ],
)
def test_malformed_kv_hints_name_their_field(env, field):
    with pytest.raises(HintError) as err:
        parse_hints(None, kv_hints=env)
    assert err.value.field == field


# ------------------------------------------------------------------ precedence


def test_ours_first_then_kv_hints_then_xargs():
    assert parse_hints(OURS, kv_hints=KV_HINTS, extra_args=XARGS).program_id == "ours"
    assert parse_hints({"lmcache": {}}, kv_hints=KV_HINTS, extra_args=XARGS).program_id == "env"
    assert parse_hints(None, kv_hints=None, extra_args=XARGS).program_id == "job-7"


def test_a_malformed_higher_source_is_an_error_not_a_fallback():
    bad = {"continuum": {"program_id": "p", "turn": "one"}}
    with pytest.raises(HintError, match=r"continuum\.turn"):
        parse_hints(bad, kv_hints=KV_HINTS, extra_args=XARGS)
    with pytest.raises(HintError, match=r"kv_hints\.actions\[0\]\.payload\.turn"):
        parse_hints(None, kv_hints=envelope({"program_id": "p"}), extra_args=XARGS)


def test_lower_sources_are_not_read_once_a_higher_one_is_present():
    assert parse_hints(OURS, extra_args={"job_id": 1.5}).program_id == "ours"
    assert parse_hints(None, kv_hints=KV_HINTS, extra_args={"job_id": 1.5}).program_id == "env"


# ------------------------------------------------------------------ in vLLM's Scheduler

BLOCK = 32


@pytest.fixture(scope="module")
def driver_config(tiny_model_dir) -> tuple[DriverConfig, object]:
    cfg = DriverConfig(
        model_dir=tiny_model_dir,
        num_blocks=40,
        block_size=BLOCK,
        kv_transfer_config={"kv_connector": "ContinuumConnector", "kv_role": "kv_both"},
    )
    return cfg, build_vllm_config(cfg)


class Clock:
    now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def driver(driver_config) -> Iterator[SchedulerDriver]:
    cfg, vllm_config = driver_config
    d = SchedulerDriver(cfg, vllm_config)
    d.clock = Clock()
    d.connector.bind_tiers(NoTiers(d.clock))
    d.connector.policy = StaticTTLPolicy(100.0)
    initial_free = d.block_pool.get_num_free_blocks()
    yield d
    for _ in range(1000):  # drain, then let every deadline pass: nothing may be left
        if not d.scheduler.has_requests():
            break
        d.step()
    d.clock.now += 1e6
    d.step()
    assert len(d.connector.pins) == 0
    assert d.block_pool.get_num_free_blocks() == initial_free


def submit(
    d: SchedulerDriver,
    rid: str,
    prompt: list[int],
    extra_args: dict[str, Any] | None = None,
    kv_hints: KvHintsEnvelope | None = None,
) -> Request:
    """Like ``SchedulerDriver.add_request``, with the request's ``extra_args`` (where vLLM
    puts ``vllm_xargs``) and ``kv_hints`` set."""
    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0, extra_args=extra_args)
    request = Request(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling_params=params,
        pooling_params=None,
        arrival_time=d.clock.now,
        block_hasher=d._block_hasher,
        kv_hints=kv_hints,
    )
    d.scheduler.add_request(request)
    return request


def run(d: SchedulerDriver, rid: str) -> None:
    for _ in range(500):
        finished = d.step().finished_request_ids
        d.clock.now += 0.01
        if rid in finished:
            return
    raise AssertionError(f"{rid} did not finish")


def turn(d: SchedulerDriver, rid: str, prompt: list[int], **sources: Any) -> list[int]:
    request = submit(d, rid, prompt, **sources)
    run(d, rid)
    return prompt + list(request.output_token_ids)


def tokens(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=n)


def test_program_known_only_by_vllm_xargs_is_pinned_and_its_next_turn_hits_the_pin(driver):
    context = turn(driver, "a0", tokens(0, 320), extra_args={"job_id": "A", "this_func_call": "ls"})
    pin = driver.connector.pins.get("A")
    assert pin is not None and pin.num_blocks == 10  # 322 tokens: 10 full blocks
    # Two other programs, one by each of the other sources, churn the rest of the pool.
    turn(driver, "b0", tokens(1000, 600), kv_hints=envelope({"program_id": "B", "turn": 0}))
    turn(driver, "c0", tokens(2000, 750), extra_args={"job_id": "C", "is_last_step": 1})
    assert driver.connector.programs.get("C") is None  # its last step ended it

    xargs = {"job_id": "A", "this_func_call": "cat", "last_func_call": "ls"}
    submit(driver, "a1", [*context, *tokens(3000, 40)], extra_args=xargs)
    assert driver.step().prefix_hit_tokens("a1") == 320
    assert driver.connector.pins.get("A") is None  # handed over to the running turn
    run(driver, "a1")
    stats = driver.connector._counters
    assert stats["pinned_prefix_hit_tokens"] == 320 and stats["pin_handovers"] == 1
    assert stats["hints_rejected"] == 0
    turn(driver, "a2", tokens(0, 10), extra_args={"job_id": "A", "is_last_step": True})
    assert driver.connector.programs.get("A") is None


def test_malformed_xargs_are_ignored_and_the_request_served(driver):
    turn(driver, "x0", tokens(0, 100), extra_args={"job_id": "A", "is_last_step": "maybe"})
    assert driver.connector._counters["hints_rejected"] == 1
    assert len(driver.connector.pins) == 0 and len(driver.connector.programs) == 0
