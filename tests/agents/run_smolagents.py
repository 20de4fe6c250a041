"""Run a smolagents ``CodeAgent``, unmodified, against an OpenAI-compatible endpoint.

Runs in the agents' own environment (``.venv/agents``, see scripts/bootstrap.sh):
``python run_smolagents.py BASE_URL TASK STEPS``. The agent keeps its own memory and
rebuilds the messages from it every step, as its users run it; a random model writes no
parsable code, so each step ends in a parsing error the agent feeds back, which still
makes one conversation. Prints the agent's steps as JSON.
"""

from __future__ import annotations

import json
import sys

from smolagents import CodeAgent, OpenAIModel
from smolagents.monitoring import LogLevel


def main(base_url: str, task: str, steps: int) -> None:
    model = OpenAIModel(model_id="tiny", api_base=base_url, api_key="EMPTY", max_tokens=8)
    agent = CodeAgent(tools=[], model=model, max_steps=steps, verbosity_level=LogLevel.OFF)
    agent.run(task)
    print(json.dumps({"steps": len(agent.memory.steps)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
