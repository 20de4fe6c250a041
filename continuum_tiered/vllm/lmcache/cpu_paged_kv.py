"""A torch-only LMCache GPU connector for the paged KV cache of vLLM's CPU build.

LMCache moves KV between the engine's paged cache and its own memory objects through a
"GPU connector". It ships CUDA, XPU, MUSA and HPU ones; this one does the same gather and
scatter with plain torch indexing on the CPU tensors of vLLM's ``CPU_ATTN`` backend.

vLLM's CPU cache, one tensor per layer: ``[num_blocks, num_kv_heads, block_size,
2 * head_size]``, which the attention kernel views as ``[num_blocks, num_kv_heads,
2 * block_size, head_size]`` and splits in two along dim 2: within each (block, head) the
block's keys come first, then its values. LMCache's memory objects are ``KV_2LTD``:
``[2, num_layers, num_tokens, num_kv_heads * head_size]``.

Token positions arrive as vLLM slots (``block_id * block_size + offset``) in the
``slot_mapping`` keyword; ``start:end`` selects the tokens of one memory object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.metadata import LMCacheMetadata


class CPUPagedKVConnector(GPUConnectorInterface):
    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.kvcaches: list[torch.Tensor] | None = None

    @classmethod
    def from_metadata(cls, metadata: LMCacheMetadata) -> CPUPagedKVConnector:
        if metadata.use_mla:
            raise ValueError("CPUPagedKVConnector: MLA models are not supported")
        num_layers, _, _, num_kv_heads, head_size = metadata.kv_shape
        return cls(num_layers, num_kv_heads, head_size)

    # ------------------------------------------------------------ LMCache API

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.num_kv_heads * self.head_size])

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        if "kvcaches" in kwargs:
            self.kvcaches = [self._split_kv(layer) for layer in kwargs["kvcaches"]]

    def from_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Gather tokens ``start:end`` of every layer into ``memory_obj``."""
        target = self._kv_tensor(memory_obj)
        blocks, offsets = self._slots(start, end, **kwargs)
        for layer, kv in enumerate(self._layers()):
            # [tokens, heads, 2, head_size] -> [2, tokens, heads * head_size]
            picked = kv[blocks, :, :, offsets]
            target[:, layer].copy_(picked.permute(2, 0, 1, 3).reshape(2, end - start, -1))

    def to_gpu(self, memory_obj: MemoryObj, start: int, end: int, **kwargs: Any) -> None:
        """Scatter ``memory_obj`` into the slots of tokens ``start:end`` of every layer."""
        source = self._kv_tensor(memory_obj)
        blocks, offsets = self._slots(start, end, **kwargs)
        shape = (2, end - start, self.num_kv_heads, self.head_size)
        for layer, kv in enumerate(self._layers()):
            kv[blocks, :, :, offsets] = source[:, layer].reshape(shape).permute(1, 2, 0, 3)

    def batched_from_gpu(
        self, memory_objs: Sequence[MemoryObj], starts: list[int], ends: list[int], **kwargs: Any
    ) -> None:
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(memory_obj, start, end, **kwargs)

    def batched_to_gpu(
        self,
        memory_objs: Sequence[MemoryObj] | None = None,
        starts: list[int] | None = None,
        ends: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if memory_objs is None or starts is None or ends is None:
            raise ValueError("CPUPagedKVConnector: layerwise loading is not supported")
        for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(memory_obj, start, end, **kwargs)

    # --------------------------------------------------------------- internals

    def _split_kv(self, layer: torch.Tensor) -> torch.Tensor:
        """``[blocks, heads, block_size, 2 * head_size]`` viewed as
        ``[blocks, heads, 2, block_size, head_size]`` (keys, then values)."""
        if layer.dim() != 4 or layer.shape[1] != self.num_kv_heads:
            raise ValueError(
                "CPUPagedKVConnector: expected a vLLM CPU KV cache layer of shape "
                f"[blocks, {self.num_kv_heads}, block_size, {2 * self.head_size}], "
                f"got {tuple(layer.shape)}"
            )
        num_blocks, heads, block_size, _ = layer.shape
        return layer.view(num_blocks, heads, 2, block_size, self.head_size)

    def _layers(self) -> list[torch.Tensor]:
        if self.kvcaches is None:
            raise RuntimeError("CPUPagedKVConnector: no KV caches were given (kvcaches=...)")
        return self.kvcaches

    def _slots(self, start: int, end: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.initialize_kvcaches_ptr(**kwargs)
        if "slot_mapping" not in kwargs:
            raise ValueError("CPUPagedKVConnector: 'slot_mapping' must be given")
        slots = kwargs["slot_mapping"][start:end].to(torch.long)
        block_size = self._layers()[0].shape[3]
        return slots // block_size, slots % block_size

    @staticmethod
    def _kv_tensor(memory_obj: MemoryObj) -> torch.Tensor:
        if memory_obj.metadata.fmt != MemoryFormat.KV_2LTD or memory_obj.tensor is None:
            raise ValueError(
                f"CPUPagedKVConnector: expected a KV_2LTD memory object, got "
                f"{memory_obj.metadata.fmt}"
            )
        return memory_obj.tensor
