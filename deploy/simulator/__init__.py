"""``alignloop simulate``: simulated users driving a running alignloop over its public API.

One job per module:

* :mod:`~deploy.simulator.preferences`: hidden preferences over answer text (built-ins and
  ``module:callable`` plug-ins);
* :mod:`~deploy.simulator.population`: users of uneven activity, who rates, bias, noise;
* :mod:`~deploy.simulator.prompts`: built-in question templates and JSONL prompt files;
* :mod:`~deploy.simulator.driver`: the async HTTP driver, :class:`SimConfig`, :func:`run`;
* :mod:`~deploy.simulator.registry_watch`: the registry's events through the admin API;
* :mod:`~deploy.simulator.report`: per-minute tables and the JSON :class:`Summary`;
* :mod:`~deploy.simulator.cli`: the command line.

The library entry point is ``await run(SimConfig(...))`` (or ``run_sync``), which returns
the :class:`Summary`; ``benchmarks/loop.py`` and the tests call it.
"""

from deploy.simulator.driver import SimConfig, SimulationError, Until, run, run_sync
from deploy.simulator.population import PopulationConfig
from deploy.simulator.report import Summary

__all__ = [
    "PopulationConfig",
    "SimConfig",
    "SimulationError",
    "Summary",
    "Until",
    "run",
    "run_sync",
]
