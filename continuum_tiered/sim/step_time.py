"""How long a GPU step of a scheduled batch takes, from a tier profile.

A profile that measured the serving engine's whole steps (``profile --engine``) gives
the fits below from those: a request waits for vLLM's scheduling, input preparation,
sampling and output processing, and for vLLM's own attention kernels, not for a bare
transformers forward pass (on the CPU build the two differ by 2x per KV token read).
Without them, the model-only fits are used.

- Prefill of ``n`` new tokens after ``o`` cached ones costs the increment of the profiled
  prefill curve t(n) = c0 + c1 n + c2 n^2 between o and o + n: linear work for the new
  tokens plus their attention over the whole context.
- Decode of a batch of ``b`` sequences with total context ``C`` costs
  d0 + d1 b + d2 C: weights read once per step, a per-sequence cost, and the KV read.
  Profiles measured by ``continuum-tiered profile`` carry these coefficients; without
  them they come from an HBM roofline (weights and KV bytes over memory bandwidth).
- A mixed step pays the larger of the fixed costs once, then both variable parts: a
  conservative sum, since the prefill is compute-bound and the decode memory-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from continuum_tiered.core.profile import TierProfile, prefill_increment
from continuum_tiered.core.roofline import parameter_count

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
PER_SEQUENCE_DECODE_S = 1e-5  # sampling and bookkeeping per sequence


@dataclass(frozen=True)
class StepTimeModel:
    prefill_coeffs: tuple[float, float, float]
    decode_coeffs: tuple[float, float, float]

    @classmethod
    def from_profile(
        cls, profile: TierProfile, hf_config: dict, hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S
    ) -> StepTimeModel:
        if profile.engine is not None:
            return cls(profile.serving_prefill_coeffs, profile.engine.decode_coeffs)
        decode = profile.decode_coeffs
        if decode is None:
            weights = parameter_count(hf_config) * profile.model.dtype_bytes
            decode = (
                weights / hbm_bytes_per_s,
                PER_SEQUENCE_DECODE_S,
                profile.model.kv_bytes_per_token / hbm_bytes_per_s,
            )
        return cls(profile.prefill_coeffs, tuple(decode))

    def step_s(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        c0 = self.prefill_coeffs[0] if prefill_chunks else 0.0
        d0, d1, d2 = self.decode_coeffs
        fixed = max(c0, d0 if decode_contexts else 0.0)
        prefill = sum(prefill_increment(self.prefill_coeffs, o, n) for o, n in prefill_chunks)
        decode = d1 * len(decode_contexts) + d2 * sum(decode_contexts) if decode_contexts else 0.0
        return fixed + prefill + decode
