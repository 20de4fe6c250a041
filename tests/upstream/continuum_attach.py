"""pytest plugin: attach ``ContinuumConnector`` to every scheduler vLLM's own tests build.

Loaded by ``run_vllm_suite.py`` with ``-p continuum_attach`` into a pytest run of vLLM's
``tests/v1/core/test_scheduler.py`` and ``test_prefix_caching.py`` (from the sdist of the
installed vLLM). The variant comes from ``CONTINUUM_UPSTREAM_VARIANT``:

- ``baseline``: nothing attached (vLLM's tests as they are, in this environment);
- ``a``: the connector attached to every scheduler whose test set no connector of its own;
- ``b``: as ``a``, and every request carries program hints: requests added to a scheduler
  are numbered 0, 1, 2, ...; request ``n`` is turn ``n % 2`` of program ``n // 2``;
- ``c``: as ``b``, and right after the scheduler is built pins of fake programs, of
  ``CONTINUUM_UPSTREAM_SEED_PIN_BLOCKS`` blocks each (default 8), hold
  ``CONTINUUM_UPSTREAM_SEED_FRACTION`` (default 1.0) of the pool's free blocks, with
  prefix-cache hashes when the pool caches, so admission and running requests go through
  the connector's pressure paths.

``CONTINUUM_UPSTREAM_EXTRA`` (JSON) is the connector's ``kv_connector_extra_config``.

The connector is attached by wrapping ``Scheduler.__init__``: when the ``VllmConfig`` it
gets has no ``kv_transfer_config``, one naming ``ContinuumConnector`` is set on it first.
Schedulers of tests that configure their own connector are left alone, and so are
encoder-decoder models (vLLM refuses any KV connector for those).

``CONTINUUM_UPSTREAM_REPORT`` names a JSON file that gets, per test, its outcome, the
failure message and a record of the connector's part in it: how many schedulers the test
built, how many got the connector, hinted requests, seeded pin blocks, pins created and
released by reason, so the runner can tell which tests exercised the connector.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import weakref
from collections import Counter
from typing import Any

import pytest

VARIANTS = ("baseline", "a", "b", "c")
SEED_PROGRAM = "continuum-seed"
SEED_TTL_S = 3600.0  # never expires within a test

_variant = os.environ.get("CONTINUUM_UPSTREAM_VARIANT", "baseline")
_extra_config: dict[str, Any] = json.loads(os.environ.get("CONTINUUM_UPSTREAM_EXTRA", "{}"))
_seed_fraction = float(os.environ.get("CONTINUUM_UPSTREAM_SEED_FRACTION", "1.0"))
_seed_pin_blocks = max(1, int(os.environ.get("CONTINUUM_UPSTREAM_SEED_PIN_BLOCKS", "8")))

# Per-test bookkeeping, reset before each test.
_record: Counter[str] = Counter()
_results: dict[str, dict[str, Any]] = {}  # node id -> outcome, message, connector record
_deselected: list[str] = []
_connectors: list[tuple[weakref.ref[Any], weakref.ref[Any]]] = []  # (scheduler, connector)
_our_configs: dict[int, Any] = {}  # id -> the KVTransferConfig we made (kept alive)


def pytest_configure(config: pytest.Config) -> None:
    if _variant not in VARIANTS:
        raise pytest.UsageError(f"CONTINUUM_UPSTREAM_VARIANT must be one of {VARIANTS}")
    # Markers vLLM's own conftest registers; ours replaces that conftest (--noconftest).
    for marker in ("cpu_test", "skip_global_cleanup", "core_model", "slow_test"):
        config.addinivalue_line("markers", f"{marker}: vLLM test marker")
    if _variant == "baseline":
        return
    from continuum_tiered.vllm.plugin import register

    register()  # what vLLM's general-plugins entry point does in a real process
    _patch_scheduler()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the node ids listed in CONTINUUM_UPSTREAM_DESELECT (a file, one per line;
    an id without parameters covers every parametrization)."""
    path = os.environ.get("CONTINUUM_UPSTREAM_DESELECT")
    if not path:
        return
    with open(path) as f:
        wanted = {line.strip() for line in f if line.strip()}
    keep, drop = [], []
    for item in items:
        (drop if item.nodeid in wanted or item.nodeid.split("[")[0] in wanted else keep).append(
            item
        )
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
        _deselected.extend(item.nodeid for item in drop)


# ----------------------------------------------------------------- vLLM fixtures we supply


@pytest.fixture()
def caplog_vllm(caplog: pytest.LogCaptureFixture):
    """vLLM's conftest fixture of that name: its logger's records reach ``caplog``."""
    vllm_logger = logging.getLogger("vllm")
    propagate = vllm_logger.propagate
    vllm_logger.propagate = True
    try:
        with caplog.at_level(logging.INFO):
            yield caplog
    finally:
        vllm_logger.propagate = propagate


# ------------------------------------------------------------------------- bookkeeping


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _record.clear()
    _connectors.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect each test's outcome, failure message and connector bookkeeping."""
    entry = _results.setdefault(report.nodeid, {"outcome": "passed"})
    if report.failed and entry["outcome"] != "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["outcome"] = "failed"
        entry["phase"] = report.when
        entry["message"] = crash.message if crash is not None else str(report.longrepr)
        entry["where"] = f"{crash.path}:{crash.lineno}" if crash is not None else ""
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["message"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    if report.when == "call" or (report.when == "setup" and not report.passed):
        entry["connector"] = _connector_record()


def _connector_record() -> dict[str, Any]:
    data: dict[str, Any] = dict(_record)
    created = 0
    releases: Counter[str] = Counter()
    for scheduler_ref, connector_ref in _connectors:
        scheduler, connector = scheduler_ref(), connector_ref()
        if scheduler is not None and scheduler.connector is not connector:
            data["schedulers_connector_replaced_by_test"] = (
                data.get("schedulers_connector_replaced_by_test", 0) + 1
            )
        pins = getattr(connector, "_pins", None)
        if pins is None:
            continue
        created += pins.pins_created
        for reason, count in pins.releases.items():
            releases[getattr(reason, "value", str(reason))] += count
    if created:
        data["pins_created"] = created
    if releases:
        data["pin_releases"] = dict(releases)
    return data


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("CONTINUUM_UPSTREAM_REPORT")
    if path:
        with open(path, "w") as f:
            report = {"variant": _variant, "tests": _results, "deselected": _deselected}
            json.dump(report, f, indent=1, sort_keys=True)


# --------------------------------------------------------------------------- patching


def _patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__
    add_request = Scheduler.add_request

    @functools.wraps(init)
    def patched_init(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        kv_cache_config = kwargs.get("kv_cache_config", args[0] if args else None)
        attach = _should_attach(vllm_config, kv_cache_config)
        _record["schedulers"] += 1
        if attach:
            _attach(vllm_config)
        init(self, vllm_config, *args, **kwargs)
        self._continuum_requests = 0
        self._continuum_attached = attach
        if not attach:
            return
        _record["schedulers_with_connector"] += 1
        _connectors.append((weakref.ref(self), weakref.ref(self.connector)))
        _count_turn_ends(self.connector)
        if _variant == "c":
            _seed_pins(self)

    @functools.wraps(add_request)
    def patched_add_request(self: Any, request: Any) -> None:
        if (
            _variant in ("b", "c")
            and getattr(self, "_continuum_attached", False)
            and request.request_id not in self.requests
            and request.kv_transfer_params is None
        ):
            from continuum_tiered.core.hints import ProgramHints

            n = self._continuum_requests
            self._continuum_requests += 1
            hints = ProgramHints(program_id=f"program-{n // 2}", turn=n % 2, last_turn=False)
            request.kv_transfer_params = hints.to_params()
            _record["hinted_requests"] += 1
        return add_request(self, request)

    Scheduler.__init__ = patched_init  # type: ignore[method-assign]
    Scheduler.add_request = patched_add_request  # type: ignore[method-assign]


def _count_turn_ends(connector: Any) -> None:
    """Count, on this connector instance, the hinted requests that finished normally and
    how many of those had full hashed blocks to pin (none where prefix caching is off)."""
    finished = connector.request_finished

    @functools.wraps(finished)
    def counted(request: Any, block_ids: list[int]) -> Any:
        if request.request_id in connector._hints and request.status in _pinnable():
            _record["hinted_turns_finished"] += 1
            pool = connector._block_pool
            if block_ids and pool.blocks[block_ids[0]].block_hash is not None:
                _record["hinted_turns_finished_with_hashed_blocks"] += 1
        return finished(request, block_ids)

    connector.request_finished = counted


@functools.cache
def _pinnable() -> frozenset[Any]:
    from vllm.v1.request import RequestStatus

    return frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED})


def _should_attach(vllm_config: Any, kv_cache_config: Any) -> bool:
    from vllm.config import VllmConfig

    if not isinstance(vllm_config, VllmConfig):
        _record["schedulers_mock_config"] += 1
        return False
    current = vllm_config.kv_transfer_config
    if current is not None and id(current) not in _our_configs:
        _record["schedulers_own_connector"] += 1
        return False
    model_config = vllm_config.model_config
    if model_config is not None and model_config.is_encoder_decoder:
        _record["schedulers_encoder_decoder"] += 1
        return False
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups is not None and len(groups) > 1:
        # Several KV cache groups need the hybrid KV cache manager, which vLLM turns off
        # for a connector without HMA support such as ours: with our connector a real
        # engine never gets this KV cache layout.
        _record["schedulers_hybrid_kv_groups"] += 1
        return False
    return True


def _attach(vllm_config: Any) -> None:
    from vllm.config import KVTransferConfig

    if id(vllm_config.kv_transfer_config) in _our_configs:
        return
    config = KVTransferConfig(
        kv_connector="ContinuumConnector",
        kv_role="kv_both",
        kv_connector_extra_config=dict(_extra_config),
    )
    _our_configs[id(config)] = config
    vllm_config.kv_transfer_config = config
    # What VllmConfig.__post_init__ does for a connector without HMA support when the
    # user did not force the hybrid KV cache manager on (no test here does).
    vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = True


def _seed_pins(scheduler: Any) -> None:
    """Pin fake programs' blocks: ``_seed_fraction`` of the free blocks, in pins of
    ``_seed_pin_blocks`` blocks (the last one smaller), each block with a prefix-cache hash
    (when the pool caches) and only the pin's reference, as a finished turn's pin would."""
    from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

    from continuum_tiered.core.pins import Pin

    connector = scheduler.connector
    pool = scheduler.kv_cache_manager.block_pool
    total = int(pool.get_num_free_blocks() * _seed_fraction)
    block_size = scheduler.cache_config.block_size
    for k, start in enumerate(range(0, total, _seed_pin_blocks)):
        num_blocks = min(_seed_pin_blocks, total - start)
        program_id = f"{SEED_PROGRAM}-{k}"
        blocks = pool.get_new_blocks(num_blocks)
        if pool.enable_caching:
            for i, block in enumerate(blocks):
                key = make_block_hash_with_group_id(BlockHash(f"{program_id}:{i}".encode()), 0)
                block.set_block_hash(key, num_tokens=(i + 1) * block_size)
                pool.cached_block_hash_to_block.insert(key, block)
        now = connector.tiers.now()
        program = connector.programs.arrive(program_id, now)
        with contextlib.suppress(TypeError):  # keep the program table's view consistent
            connector.programs.turn_finished(
                program_id, now, None, num_blocks * block_size, pinned=True
            )
        connector.pins.pin(
            Pin(
                program_id=program_id,
                program_seq=program.seq,
                blocks=blocks,
                pinned_at_s=now,
                deadline_s=now + SEED_TTL_S,
                tool=None,
                context_tokens=num_blocks * block_size,
                benefit_s=1.0,
            )
        )
        pool.free_blocks(blocks)  # the pin's reference is now the only one
        _record["seeded_pins"] += 1
        _record["seeded_pin_blocks"] += num_blocks
