"""A seeded task-app simulator and an in-process runner: policies side by side, no HTTP.

- `scenarios`: what a simulated world is (`Scenario`, frozen and self-checked) and the
  named presets `linear`, `realistic`, `drift`, `slow-drift`.
- `streams`: the common random numbers; every draw comes from a stream keyed by
  (seed, stream, user, round, …), never from a generator shared across users or policies.
- `simulator`: users' hidden parameters, each round's candidate tasks and hour, the true
  utility of every candidate and the user's response to the one shown.
- `policies`: what the runner drives (`SimPolicy`), the adapter for the core's LinUCB
  policies, and the `uniform` and `oracle` baselines.
- `runner` and `summary`: run every policy on the same draws; regret curves and paired
  standard errors over seeds.

Like `core/`, this package knows nothing of HTTP, databases, time or logging; it reads
`oo_serving.core` and nothing else of the project.
"""
