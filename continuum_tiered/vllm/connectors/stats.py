"""Connector statistics for vLLM's connector-stats logging and Prometheus hooks.

The scheduler-side connector hands a ``ContinuumStats`` to the scheduler each step
(``get_kv_connector_stats``); vLLM aggregates it, logs it and passes its dict to
``ContinuumPromMetrics.observe`` in the API process. Counters are deltas since the last
hand-off; gauges and per-tool TTLs are the latest values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from continuum_tiered.core.tier_model import TIER_ORDER

# Where a returning turn's prompt tokens came from (ContinuumTieredConnector counts them):
# the GPU prefix cache, each of LMCache's tiers, or recompute.
PREFIX_SOURCES = ("gpu", *TIER_ORDER, "recompute")


def prefix_counter(source: str) -> str:
    return f"prefix_tokens_from_{source}"


# Tokens of LMCache hits recomputed because their transfer was priced above the prefill.
DECLINED_LOADS = "tier_hit_tokens_recomputed"


COUNTERS = (
    "pins_created",
    "pin_expirations",
    "pin_releases_pressure",
    "pin_handovers",
    "pinned_prefix_hit_tokens",
    "hints_rejected",
    *map(prefix_counter, PREFIX_SOURCES),
    DECLINED_LOADS,
)
GAUGES = ("active_pins", "pinned_blocks")
TOOL_TTLS = "tool_ttl_s"


class ToolLabels:
    """Tool names as metric labels, bounded: each label is a Prometheus series for the
    server's lifetime, and tool names come from clients and model output. The first
    ``max_labels`` names keep their own; later ones share ``OTHER``."""

    NO_TOOL = "*"
    OTHER = "other"

    def __init__(self, max_labels: int = 64) -> None:
        self.max_labels = max_labels
        self._known: set[str] = set()

    def label(self, tool: str | None) -> str:
        if tool is None:
            return self.NO_TOOL
        if tool in self._known:
            return tool
        if len(self._known) < self.max_labels:
            self._known.add(tool)
            return tool
        return self.OTHER


@dataclass
class ContinuumStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not self.data

    def aggregate(self, other: KVConnectorStats) -> ContinuumStats:
        merged = dict(self.data)
        for key, value in other.data.items():
            if key in COUNTERS:
                merged[key] = merged.get(key, 0) + value
            elif key == TOOL_TTLS:
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
        return ContinuumStats(merged)

    def reduce(self) -> dict[str, int | float]:
        flat: dict[str, int | float] = {
            k: v for k, v in self.data.items() if k in COUNTERS or k in GAUGES
        }
        for tool, ttl in sorted(self.data.get(TOOL_TTLS, {}).items()):
            flat[f"ttl[{tool}]"] = round(ttl, 3)
        return flat


class ContinuumPromMetrics(KVConnectorPromMetrics):
    """``vllm:continuum_*`` counters and gauges, one series per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._per_engine(self._counter_cls, name, labelnames) for name in COUNTERS
        }
        self._gauges = {
            name: self._per_engine(self._gauge_cls, name, labelnames) for name in GAUGES
        }
        tool_gauge = self._gauge_cls(
            name="vllm:continuum_tool_ttl_seconds",
            documentation="Current TTL chosen for each tool's pins.",
            labelnames=[*labelnames, "tool"],
        )
        self._tool_ttl = {
            idx: (tool_gauge, values) for idx, values in per_engine_labelvalues.items()
        }

    def _per_engine(self, cls: type, name: str, labelnames: list[str]) -> dict[int, Any]:
        metric = cls(
            name=f"vllm:continuum_{name}",
            documentation=f"continuum-tiered connector: {name.replace('_', ' ')}.",
            labelnames=labelnames,
        )
        return {idx: metric.labels(*vals) for idx, vals in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, per_engine in self._counters.items():
            if value := transfer_stats_data.get(name):
                per_engine[engine_idx].inc(value)
        for name, per_engine in self._gauges.items():
            if name in transfer_stats_data:
                per_engine[engine_idx].set(transfer_stats_data[name])
        gauge, values = self._tool_ttl[engine_idx]
        for tool, ttl in transfer_stats_data.get(TOOL_TTLS, {}).items():
            gauge.labels(*values, tool).set(ttl)
