"""What a slow rank costs each training mode: the formulas ``bench --async`` is checked against.

Per rank ``i``, ``compute_s[i]`` is one step's compute (a straggler's is ``factor`` times the
others'); ``comm_s`` is the time of the exchange each mode makes.

- synchronous data parallelism: every step waits for the slowest rank, then allreduces:
  ``max_i compute_s[i] + comm_s`` per step, for all W replicas' batches together;
- local SGD averaging every H steps: the ranks meet every H steps, so the slowest sets the pace
  of each block of H: ``max_i compute_s[i] + comm_s / H`` per step;
- a parameter server without a bound: each worker loops on its own, so the updates per second
  are the sum of every worker's rate, ``sum_i 1 / (compute_s[i] + comm_s)``, until the servers'
  own rate of applying them caps it;
- bounded staleness (SSP): a fast worker may run ``s`` steps ahead and no further, so a
  *persistent* straggler still sets the pace in the long run (``W / max_i(...)`` updates per
  second, as synchronous), while a *transient* delay shorter than ``s`` steps is absorbed.
"""

from __future__ import annotations


def sync_step_s(compute_s: list[float], comm_s: float) -> float:
    """Seconds per synchronous step (one update from all W batches)."""
    return max(compute_s) + comm_s


def local_sgd_step_s(compute_s: list[float], comm_s: float, sync_every: int) -> float:
    """Seconds per local-SGD step (each rank one update of its own copy)."""
    return max(compute_s) + comm_s / sync_every


def ps_updates_per_s(compute_s: list[float], comm_s: float, apply_s: float = 0.0,
                     servers: int = 1) -> float:
    """Gradients a parameter server without a bound applies per second."""
    arrivals = sum(1.0 / (c + comm_s) for c in compute_s)
    return arrivals if apply_s <= 0 else min(arrivals, servers / apply_s)


def ssp_updates_per_s(compute_s: list[float], comm_s: float) -> float:
    """Gradients per second under bounded staleness with a persistent straggler: the bound
    lets the others get s steps ahead once, then they wait for it every step."""
    return len(compute_s) / (max(compute_s) + comm_s)
