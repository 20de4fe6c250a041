"""An OpenAI API proxy that gives unmodified agents program-level FCFS and KV pins.

``continuum-tiered proxy --upstream URL`` sits between agents and a ``continuum-tiered
serve`` (or plain vLLM with the connector and ``--scheduling-policy priority``), finds each
request's program (:mod:`~continuum_tiered.core.program_tagging`: from headers, the body
or the conversation itself) and adds the ``priority`` and
hints the agent would otherwise have to send itself (:mod:`~continuum_tiered.client.proxy.app`).
"""
