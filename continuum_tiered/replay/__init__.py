"""Real-time replay of a trace's programs against any OpenAI-compatible server (``runner``;
``continuum-tiered replay``, ``cli``). The virtual-time replay is :mod:`continuum_tiered.sim`."""
