"""Run mini-swe-agent, unmodified, against an OpenAI-compatible endpoint.

Runs in the agents' own environment (``.venv/agents``, see scripts/bootstrap.sh), not ours:
``python run_mini_swe_agent.py BASE_URL TASK STEPS``. The agent talks to the endpoint
through LiteLLM with its text-based actions config, as its users run it; a random model
writes no valid action, so every turn is a format error that the agent answers, which
still makes one conversation. Prints the agent's exit status and its model calls as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import minisweagent
import yaml
from minisweagent.agents.default import DefaultAgent
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models.litellm_textbased_model import LitellmTextbasedModel


def main(base_url: str, task: str, steps: int) -> None:
    config_file = Path(minisweagent.__file__).parent / "config" / "mini_textbased.yaml"
    config = yaml.safe_load(config_file.read_text())
    model = LitellmTextbasedModel(
        model_name="openai/tiny",
        model_kwargs={"api_base": base_url, "api_key": "EMPTY", "max_tokens": 8},
        cost_tracking="ignore_errors",
    )
    agent_config = {**config["agent"], "step_limit": steps, "max_consecutive_format_errors": 0}
    agent = DefaultAgent(model, LocalEnvironment(), **agent_config)
    result = agent.run(task)
    print(json.dumps({"exit_status": result.get("exit_status"), "model_calls": agent.n_calls}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
