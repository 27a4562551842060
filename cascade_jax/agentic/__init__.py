"""Multi-turn agentic rollouts (docs/agentic.md).

* :mod:`.env`         the environment protocol (reset / step / truncate / close), ``ToolEnvironment``
* :mod:`.render`      one episode = one token row (chat template, tool-call parser, loss mask)
* :mod:`.episode`     the episode loop with limits; scripted policies
* :mod:`.tools`       sandboxed repository tools on a per-episode writable copy
* :mod:`.swe`         the OpenHands-style SWE environment (bash, editor, finish; reward = tests)
* :mod:`.swe_tasks`   seeded SWE-bench-format tasks over generated Python repositories
* :mod:`.lookup`      the tiny multi-turn tool domain (look a code up, answer with it)
* :mod:`.driver`      many episodes on the JaxEngine, tools on a thread pool; RLBatch packing
* :mod:`.stage`       an agentic GRPO stage's rollouts (config section ``agentic``) and evaluation
"""

from .driver import DriverStats, pack_episodes, run_episodes
from .env import Environment, Reset, Step, Tool, ToolEnvironment, tool_spec
from .episode import Episode, EpisodeLimits, EpisodeRun, ScriptedPolicy, run_episode
from .lookup import LookupEnv, lookup_tasks, score_lookup
from .render import AssistantTurn, ChatRenderer, EpisodeRow, RenderError
from .swe import SWEEnv, evaluate_workspace, swe_sft_rows
from .swe_tasks import swe_tasks
from .tools import ToolLimits, ToolResult, Workspace

__all__ = ["DriverStats", "pack_episodes", "run_episodes", "Environment", "Reset", "Step", "Tool",
           "ToolEnvironment", "tool_spec", "Episode", "EpisodeLimits", "EpisodeRun",
           "ScriptedPolicy", "run_episode", "LookupEnv", "lookup_tasks", "score_lookup",
           "AssistantTurn", "ChatRenderer", "EpisodeRow", "RenderError", "SWEEnv",
           "evaluate_workspace", "swe_sft_rows", "swe_tasks", "ToolLimits", "ToolResult", "Workspace"]
