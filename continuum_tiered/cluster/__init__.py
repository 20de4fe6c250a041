"""Scale-out on existing parts: several vLLM replicas behind vLLM's router
(``vllm-router``, program-affine by session id) and a shared Redis tier behind LMCache's
local ones, started and stopped as one cluster."""
