"""LMCache on vLLM's CPU build: a torch-only connector and the narrow patch that selects it.

LMCache picks the connector between vLLM's paged KV cache and its memory objects in
``lmcache.v1.gpu_connector.CreateGPUConnector``, which knows CUDA, XPU, MUSA and HPU and
raises "No supported cpu connector found" on a CPU-only build. ``install()`` wraps that one
function: for vLLM on the CPU platform it returns ``CPUPagedKVConnector``; every other call
goes to LMCache's own function unchanged. LMCache looks the function up at call time
(``vllm_service_factory`` imports it inside ``get_or_create_lmcache_engine``), so wrapping
the module attribute is enough; nothing else in LMCache is touched.

Checked against the LMCache versions in ``compat.CHECKED_LMCACHE``; on another version
``install`` raises ``compat.CompatError`` instead of patching.
"""

from __future__ import annotations

import functools
from typing import Any

from continuum_tiered.vllm import compat


def install() -> bool:
    """Make LMCache use ``CPUPagedKVConnector`` for vLLM on a CPU-only build.

    Returns whether the patch is in place (False where LMCache already has a device
    connector, i.e. not on CPU). Safe to call more than once.
    """
    import lmcache
    import lmcache.v1.gpu_connector as gpu_connector

    if lmcache.torch_device_type != "cpu":
        return False
    compat.check_lmcache()
    if getattr(gpu_connector.CreateGPUConnector, "_continuum_cpu", False):
        return True
    gpu_connector.CreateGPUConnector = _with_cpu_connector(gpu_connector.CreateGPUConnector)
    return True


def _with_cpu_connector(create: Any) -> Any:
    from lmcache.utils import EngineType

    @functools.wraps(create)
    def create_gpu_connector(config: Any, metadata: Any, engine: Any, *args: Any, **kwargs: Any):
        if engine != EngineType.VLLM:
            return create(config, metadata, engine, *args, **kwargs)
        if config.use_layerwise or config.enable_blending:
            raise ValueError(
                "LMCache on vLLM's CPU build supports neither use_layerwise nor "
                "enable_blending; set both to false"
            )
        from continuum_tiered.vllm.lmcache.cpu_paged_kv import CPUPagedKVConnector

        return CPUPagedKVConnector.from_metadata(metadata)

    create_gpu_connector._continuum_cpu = True  # type: ignore[attr-defined]
    return create_gpu_connector
