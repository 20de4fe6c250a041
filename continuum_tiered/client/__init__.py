"""What agents run: the hints helper (``agent_program``) and, for agents that cannot send
hints, an OpenAI API proxy that adds them (``proxy/``)."""
