"""The tool a finished turn called, read from its reply when the client sent no hint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from continuum_tiered.core.hints import tool_from_reply

if TYPE_CHECKING:
    from vllm.config import ModelConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)


class ReplyToolParser:
    """Detokenizes a finished reply and applies the traces' tool naming rule.

    The scheduler process has no detokenizer of its own, so the model's tokenizer is
    loaded on first use; with ``--skip-tokenizer-init`` or a tokenizer that fails to load,
    every turn's tool is unknown (the policy then uses the all-tools distribution).
    """

    def __init__(self, model_config: ModelConfig):
        self._model_config = model_config
        self._tokenizer: Any = None
        self._unavailable = model_config.skip_tokenizer_init

    def tool_of(self, request: Request) -> str | None:
        tokenizer = self._load()
        if tokenizer is None or not request.output_token_ids:
            return None
        return tool_from_reply(tokenizer.decode(list(request.output_token_ids)))

    def _load(self) -> Any:
        if self._tokenizer is None and not self._unavailable:
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(
                    self._model_config.tokenizer,
                    trust_remote_code=self._model_config.trust_remote_code,
                )
            except Exception as err:  # any loader failure only costs us the tool name
                logger.warning("ContinuumConnector: no tokenizer for tool names: %s", err)
                self._unavailable = True
        return self._tokenizer
