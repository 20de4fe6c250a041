"""Prefill and decode step time of the model's real shape, with random weights.

The model is built from its config alone (nothing downloaded) by transformers, in the
chosen dtype on the chosen device, and runs under ``torch.inference_mode()``. Prefill
keeps the logits of the last token only, as a serving engine does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, StaticCache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from continuum_tiered.core.profile import ModelShape, fit_quadratic
from continuum_tiered.profiling.measure import ProfilingError, median_seconds, nonnegative_lstsq

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIRST_PREFILL_TOKENS = 1024
MIN_PREFILL_POINTS = 3  # a quadratic needs three
GRID_PREFILL_POINTS = 4  # one more, so that the fit's error on its own points means something


@dataclass(frozen=True)
class PrefillResult:
    lengths: tuple[int, ...]
    seconds: tuple[float, ...]
    coeffs: tuple[float, float, float]
    method: str  # how the fit was made, and where the grid stopped early


@dataclass(frozen=True)
class DecodeResult:
    points: tuple[tuple[int, int, float], ...]  # (batch, context tokens, seconds per step)
    coeffs: tuple[float, float, float]


def transformers_config(config: dict[str, object]) -> PretrainedConfig:
    """The transformers config of an HF ``config.json``; refuses what is not a causal LM."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ProfilingError("config has no model_type, so transformers cannot build the model")
    rest = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(model_type, **rest)
    except (ValueError, TypeError, KeyError) as exc:
        raise ProfilingError(f"transformers cannot read this config: {exc}") from exc
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ProfilingError(f"model_type {model_type!r} has no causal-LM class in transformers")
    return hf_config


def max_context(hf_config: PretrainedConfig) -> int | None:
    value = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def build_model(hf_config: PretrainedConfig, dtype: str, device: str) -> torch.nn.Module:
    """Random weights, initialised on the device itself (fast on GPU, no host copy)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[dtype])
    return model.eval()


def spread(values: list[int], count: int | None) -> list[int]:
    """At most ``count`` of ``values``, evenly spaced, always keeping both ends."""
    if count is None or len(values) <= count:
        return values
    return [values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)]


def prefill_lengths(max_tokens: int, count: int | None) -> list[int]:
    """1k, 2k, 4k, ... up to ``max_tokens``, halved below 1k until there are four."""
    lengths = []
    n = FIRST_PREFILL_TOKENS
    while n <= max_tokens:
        lengths.append(n)
        n *= 2
    if not lengths:
        lengths = [max_tokens]
    while len(lengths) < GRID_PREFILL_POINTS:
        if lengths[0] < 2:
            raise ProfilingError(f"--max-tokens {max_tokens} is too small for a prefill curve")
        lengths.insert(0, lengths[0] // 2)
    return spread(lengths, count)


def measure_prefill(
    model: torch.nn.Module, lengths: list[int], repeats: int, device: str
) -> PrefillResult:
    vocab = model.config.get_text_config().vocab_size
    sync = _sync(device)
    seconds = []
    stopped = ""
    with torch.inference_mode():
        for n in tqdm(lengths, desc="prefill", unit="length"):
            ids = torch.randint(0, vocab, (1, n), device=device)
            try:
                t = median_seconds(
                    lambda ids=ids: model(input_ids=ids, use_cache=True, logits_to_keep=1),
                    sync,
                    repeats,
                    min_sample_s=0.0,
                )
            except torch.OutOfMemoryError:
                stopped = f"; stopped before {n} tokens: out of device memory"
                torch.cuda.empty_cache()
                break
            seconds.append(t)
    measured = lengths[: len(seconds)]
    if len(measured) < MIN_PREFILL_POINTS:
        raise ProfilingError(f"prefill ran out of device memory at {lengths[len(seconds)]} tokens")
    coeffs, method = fit_prefill(measured, seconds)
    return PrefillResult(tuple(measured), tuple(seconds), coeffs, method + stopped)


def fit_prefill(lengths: list[int], seconds: list[float]) -> tuple[tuple[float, float, float], str]:
    """``fit_quadratic``, unless a coefficient comes out negative (noise on a near-linear
    curve): then nonnegative least squares, as a negative term would let t(n) go below 0."""
    coeffs = fit_quadratic(lengths, seconds)
    if min(coeffs) >= 0:
        return coeffs, "least squares (fit_quadratic)"
    scale = max(lengths)
    x = np.array(lengths, dtype=float) / scale
    c0, c1, c2 = nonnegative_lstsq(np.column_stack([np.ones_like(x), x, x * x]), seconds)
    method = f"nonnegative least squares (fit_quadratic gave {_coeffs_text(coeffs)})"
    return (c0, c1 / scale, c2 / scale**2), method


def decode_grid(
    batches: tuple[int, ...], contexts: list[int], kv_bytes_per_token: int, budget_bytes: float
) -> list[tuple[int, int]]:
    """(batch, context) pairs whose KV fits in ``budget_bytes``; enough to fit three terms."""
    grid = [(b, c) for b in batches for c in contexts if b * c * kv_bytes_per_token <= budget_bytes]
    design = np.array([[1.0, b, b * c] for b, c in grid]).reshape(-1, 3)
    if np.linalg.matrix_rank(design) < 3:
        raise ProfilingError(
            f"memory for {budget_bytes / 2**30:.1f} GiB of KV does not hold enough of the "
            f"decode grid (batches {list(batches)}, contexts {contexts}) to fit it"
        )
    return grid


def measure_decode(
    model: torch.nn.Module,
    shape: ModelShape,
    grid: list[tuple[int, int]],
    repeats: int,
    device: str,
) -> DecodeResult:
    """One decode step over a cache of random KV, per grid point.

    A static cache is written in place, as vLLM's paged cache is (a dynamic cache would
    copy the whole KV at every step). It has room for the steps timed; the context grows
    by one token per step, which is noise next to the context itself.
    """
    text = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    sync = _sync(device)
    points = []
    with torch.inference_mode():
        for batch, context in tqdm(grid, desc="decode", unit="point"):
            cache = StaticCache(config=model.config, max_cache_len=context + repeats + 1)
            kv_shape = (batch, shape.num_kv_heads, context, shape.head_dim)
            for layer in range(shape.num_layers):
                k = torch.randn(kv_shape, dtype=dtype, device=device)
                cache.update(k, torch.randn_like(k), layer)
            ids = torch.randint(0, text.vocab_size, (batch, 1), device=device)
            t = median_seconds(
                lambda ids=ids, cache=cache: model(
                    input_ids=ids, past_key_values=cache, use_cache=True
                ),
                sync,
                repeats,
                min_sample_s=0.0,
            )
            points.append((batch, context, t))
            del cache
    return DecodeResult(tuple(points), fit_decode(points))


def fit_decode(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares t = d0 + d1*batch + d2*batch*context, with every coefficient >= 0."""
    design = np.array([[1.0, b, b * c] for b, c, _ in points])
    scale = design.max(axis=0)  # columns of similar magnitude keep the solve well conditioned
    d = nonnegative_lstsq(design / scale, [t for _, _, t in points])
    return (d[0] / scale[0], d[1] / scale[1], d[2] / scale[2])


def _coeffs_text(coeffs: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{c:.3g}" for c in coeffs) + ")"


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else lambda: None
