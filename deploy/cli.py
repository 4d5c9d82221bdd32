"""The `alignloop` console script: one entry point, dispatching to each package.

Each command lives in the package that owns it and is imported only when used, so
`alignloop --help` is instant and `alignloop serve` never imports the trainer.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("deploy.local.stack:main", "Start the whole loop on embedded defaults."),
    "serve": ("serving.server:main", "Run the OpenAI-compatible chat API (one replica)."),
    "keys": ("serving.keys_cli:main", "Chat API keys: keys create NAME | list | revoke NAME."),
    "ingest": ("feedback.cli:main", "Consume interactions and feedback into Postgres."),
    "data": (
        "feedback.cli:data_main",
        "Datasets and privacy: data export KIND --out F | delete --user U | purge.",
    ),
    "bootstrap-model": (
        "trainer.demo.cli:main",
        "Build a built-in base model: the demo model, or --preset smollm2-135m-instruct.",
    ),
    "policy": (
        "deploy.ops.policy_cli:main",
        "Policy registry: list, show, promote, rollback, hold.",
    ),
    "canary": ("deploy.canary.cli:main", "Run the canary controller (sequential A/B test)."),
    "admin": (
        "deploy.console.app:main",
        "Run the admin API and the console alone (the canary serves them too).",
    ),
    "db": (
        "deploy.ops.db_cli:main",
        "Schema and database roles: db migrate | roles [--create] | login NAME --component C.",
    ),
    "admin-tokens": (
        "deploy.ops.admin_auth:main",
        "Named admin tokens: admin-tokens create NAME | list | revoke NAME.",
    ),
    "train": ("trainer.rounds.cli:train_main", "Train: train reward | ppo | loop [--help]."),
    "reward": ("trainer.reward.cli:reward_main", "Reward model versions: reward list | show V."),
    "simulate": ("deploy.simulator.cli:main", "Drive a running alignloop with simulated users."),
}


# Configuration a command refuses to start with, checked before it runs: the command's name
# -> "module:function" taking the settings and returning why not (None: fine). The canary
# controller serves the admin API: a too-short admin token stops it before it takes its lease.
PREFLIGHT: dict[str, str] = {"canary": "deploy.ops.admin_auth:startup_problem"}

# Commands that train run on jemalloc where the machine has it (trainer/common/jemalloc.py:
# the process executes itself again, before importing torch).
ON_JEMALLOC = frozenset({"train"})


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: alignloop COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`alignloop COMMAND --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"alignloop: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    if name in ON_JEMALLOC and argv is None:  # this process's own command line
        from schemas.settings import Settings
        from trainer.common.jemalloc import run_on_jemalloc

        run_on_jemalloc(Settings().allocator)
    from deploy.local import cpu_plan

    cpu_plan.apply()  # the cores `alignloop up` gave this process, before any thread starts
    if name in PREFLIGHT:
        from schemas.settings import Settings

        module_name, function = PREFLIGHT[name].split(":")
        problem = getattr(importlib.import_module(module_name), function)(Settings())
        if problem:
            print(f"alignloop {name}: {problem}", file=sys.stderr)
            return 2
    module_name, function = COMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), function)
    return int(entry(rest) or 0)


if __name__ == "__main__":  # vLLM spawns workers: the entry module must be guarded
    sys.exit(main())
