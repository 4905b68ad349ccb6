"""Prints the accountant fixture as JSON (see make_fixtures.sh)."""
import json
import sys
from importlib.metadata import version

import dp_accounting
from dp_accounting import rdp

# (q, noise multiplier, rounds, delta): small and large rates, little and
# much noise, few and many rounds; the last ones are the convergence
# test's and BENCHMARKS.md's settings (4000 clients, 200 a round).
SETTINGS = [
    (0.01, 1.1, 1000, 1e-5),
    (0.01, 0.8, 100, 1e-5),
    (0.05, 1.0, 50, 1e-5),
    (0.001, 2.0, 10000, 1e-6),
    (0.1, 4.0, 200, 1e-5),
    (0.2, 0.6, 10, 1e-3),
    (0.5, 5.0, 30, 1e-5),
    (0.05, 0.7, 40, 1e-5),
    (0.05, 1.3, 40, 1e-5),
    (1.0, 10.0, 20, 1e-5),
]

cases = []
for q, z, t, d in SETTINGS:
    acc = rdp.RdpAccountant()  # default orders, add/remove neighbouring
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(event, t)
    eps, order = acc.get_epsilon_and_optimal_order(d)
    cases.append({"q": q, "noise_multiplier": z, "rounds": t, "delta": d,
                  "epsilon": eps, "order": order})

json.dump({
    "source": f"dp-accounting {version('dp-accounting')} "
              "(rdp.RdpAccountant(), PoissonSampledDpEvent(q, GaussianDpEvent(z)) composed "
              "`rounds` times, get_epsilon_and_optimal_order(delta))",
    "command": "benchmarks/dp/make_fixtures.sh",
    "python": sys.version.split()[0],
    "cases": cases,
}, sys.stdout, indent=2)
print()
