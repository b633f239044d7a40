"""A seeded task-app simulator and an in-process runner: policies side by side, no HTTP.

- `scenarios`: what a simulated world is (`Scenario`, frozen and self-checked) and the
  named presets `linear`, `realistic`, `drift`, `slow-drift`.
- `streams`: the common random numbers; every draw comes from a stream keyed by
  (seed, stream, user, round, …), never from a generator shared across users or policies.
- `simulator`: users' hidden parameters, each round's candidate tasks and hour, the true
  utility of every candidate and the user's response to the one shown.
- `policies`: what the runner drives (`SimPolicy`), the adapter that runs any registered
  core policy as the service does (population prior included), `parse_policy` for specs
  such as `linucb-v2:alpha=0.2`, and the `uniform` and `oracle` baselines.
- `runner` and `summary`: run every policy on the same draws, in an arrival order
  (`cohorts:8`: users arriving 8 at a time), with the service's population refreshes and
  no reward for ignored tips; regret curves and paired standard errors over seeds.
- `report`: the table, the summary JSON, the regret curves (PNG, matplotlib: the `report`
  extra) and a self-contained HTML page; `oo-serving simulate` prints and writes them.

Like `core/`, this package knows nothing of HTTP, databases, time or logging; it reads
`oo_serving.core` and nothing else of the project.
"""
