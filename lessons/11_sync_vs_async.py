# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 11: synchronous vs asynchronous training
#
# **Prerequisites.** The data-parallel lesson (ranks sum their gradients every step, and that is
# exactly the serial run) and the collectives lesson (allreduce, send and receive).
#
# **You will be able to** explain what a parameter server does message by message, say what
# staleness is and measure what it does to convergence, show what one slow rank costs
# synchronous training and what asynchronous training wins back, place local SGD between the
# two, and say why large-scale training today is synchronous anyway.
#
# Two ways to train one model on many devices. **Synchronous**: every device holds the same
# model and the updates are combined every step - stable, but every step waits for the slowest
# device. **Asynchronous**: each device updates on its own - no waiting, but a gradient may be
# computed on weights that others have changed since ("async can be faster but unstable"). This
# lesson measures both sides of that sentence.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

from minipar.dist.comm import CommError, run_threads
from minipar.lessons import out_dir
from minipar.parallel.param_server import replay_reference, run_parameter_server

OUT = out_dir("11")

# %% [markdown]
# ## 1. A parameter server, message by message
#
# Ranks `0 .. S-1` are servers, each owning a shard of the flat weights; the other ranks are
# workers, each looping *pull -> compute -> push* on its own (`minipar/parallel/param_server.py`;
# Dean et al. 2012, Li et al. 2014). The server applies each gradient the moment it arrives.
#
# We use a problem whose gradient we can write by hand - least squares, worker `w` at its step
# `k` has a batch `(A, b)` and loss `0.5/n |Ax - b|^2` - so every number below can be checked.

# %%
SIZE, ROWS = 6, 4
TRUE_X = np.linspace(-1, 1, SIZE)


def batch(worker, step):
    rng = np.random.default_rng(1000 * worker + step)
    a = rng.standard_normal((ROWS, SIZE))
    return a, a @ TRUE_X + 0.01 * rng.standard_normal(ROWS)


def grad_fn(worker, step, x):
    a, b = batch(worker, step)
    r = a @ x - b
    return 0.5 * float(r @ r) / ROWS, a.T @ r / ROWS


x0 = np.zeros(SIZE)

# Two workers, one step each, both pull before either pushes: worker 1's gradient is stale.
order = [("pull", 0), ("pull", 1), ("push", 0), ("push", 1)]
out = run_threads(lambda c: run_parameter_server(c, x0.copy(), grad_fn, 1, 0.5, order=order), 3)
final, server = out[0][0], out[0][1]
by_hand = x0 - 0.25 * grad_fn(0, 0, x0)[1]
by_hand = by_hand - 0.25 * grad_fn(1, 0, x0)[1]  # computed on x0, applied to x1: stale by one
assert np.array_equal(final, by_hand)
print("server handled:", server.order)
print("staleness of each push:", server.staleness, "(the second was computed one update ago)")
print("final weights equal the hand computation bit for bit:", np.array_equal(final, by_hand))

# %% [markdown]
# A free run is non-deterministic (who pushes first depends on timing), so server 0 *records*
# the order it handled pulls and pushes; replaying that order gives the same bits, and
# `replay_reference` computes what the order must produce in one plain loop. That is how the
# tests prove the asynchronous code right although every run is different.

# %%
free = run_threads(lambda c: run_parameter_server(c, x0.copy(), grad_fn, 5, 0.5), 4)
recorded = free[0][1].order
reference = replay_reference(x0.copy(), grad_fn, recorded, 3, 0.5)
assert np.array_equal(free[0][0], reference)
print(f"a free run of 3 workers x 5 steps: {len(recorded)} events, staleness "
      f"{free[0][1].staleness}; its replay reference is equal bit for bit")

# %% [markdown]
# ## 2. Staleness against convergence
#
# Any order of pulls and pushes can be prescribed, so we can make every gradient exactly `s`
# updates stale and watch what it does. `order_with_staleness` pulls the weights for update
# `i` right after update `i - s - 1`: with 8 workers round-robin, `s` goes from 0 (each gradient
# fresh, plain sequential SGD) to 7 (all 8 in flight at once). Same data, same learning rate,
# same number of updates; only the staleness changes.

# %%
WORKERS, UPDATES, LR = 8, 160, 0.3


def order_with_staleness(workers, updates, s):
    order = [("pull", i % workers) for i in range(min(s + 1, updates))]
    for i in range(updates):
        order.append(("push", i % workers))
        if i + s + 1 < updates:
            order.append(("pull", (i + s + 1) % workers))
    return order


def full_loss(x):  # the loss over every batch used, the quantity we want down
    return np.mean([grad_fn(w, k, x)[0] for w in range(WORKERS)
                    for k in range(UPDATES // WORKERS)])


def trajectory(s, staleness_lr=False):
    losses = []

    def probe(worker, step, x):  # the replay calls grad_fn once per update, in order
        losses.append(full_loss(x))
        return grad_fn(worker, step, x)

    replay_reference(x0.copy(), probe, order_with_staleness(WORKERS, UPDATES, s), WORKERS,
                     LR * WORKERS, staleness_lr)
    return losses


curves = {s: trajectory(s) for s in (0, 2, 4, 7)}
remedy = trajectory(7, staleness_lr=True)
fig, ax = plt.subplots(figsize=(7, 4))
for s, losses in curves.items():
    ax.semilogy(losses, label=f"staleness {s}")
ax.semilogy(remedy, "k--", label="staleness 7, lr / (1 + staleness)")
ax.set_xlabel("update")
ax.set_ylabel("loss over all batches (log)")
ax.set_title("The same updates, computed on older and older weights")
ax.legend()
fig.savefig(OUT / "staleness.png", dpi=120)
print(f"figure: {OUT / 'staleness.png'}")
plt.show()

end = {s: c[-1] for s, c in curves.items()}
peak = {s: max(c) for s, c in curves.items()}
print({s: f"final {end[s]:.3g}, worst {peak[s]:.3g}" for s in end})
worse = [s for s in (2, 4, 7) if end[s] > end[0]]
print(f"fresher is better here: staleness {worse} ended above staleness 0's {end[0]:.3g}; "
      f"dividing the step by 1 + staleness (Zhang et al. 2016) brings staleness 7 from "
      f"{end[7]:.3g} to {remedy[-1]:.3g}, at the price of smaller steps.")

# %% [markdown]
# **Try:** lower `LR` to 0.1 and rerun: staleness hurts far less when each step is small (a
# stale gradient is still nearly the right one). Check it: the gap between `end[7]` and
# `end[0]` should shrink.

# %% [markdown]
# ## 3. One slow rank
#
# Now the real GPT, real processes, and one rank made 3x slower on purpose (after each compute
# it sleeps twice as long as the compute took; `minipar/parallel/stragglers.py`).
# `python -m minipar.bench --async` trains the same model, data and optimizer in each mode on
# the same two workers (plus rank 0: the server, or idle), without and with the straggler.
# This runs a short version (a few seconds per mode).

# %%
from minipar.bench.asyncbench import rates, report, run_benchmark  # noqa: E402

FLAGS = ["--model", "default", "--steps", "24", "--batch-size", "32", "--snapshot-every", "6",
         "--straggler", "1:3"]
rows = run_benchmark(FLAGS, ranks=3, timeout=600)
print(report(rows, target=0.9))
walls = {(r["mode"], r["straggler"] is not None): max(t[3] for t in r["times"] if t)
         for r in rows}
for mode in ("sync", "ps", "ssp", "local-sgd"):
    slower = walls[(mode, True)] / walls[(mode, False)]
    print(f"{mode:>9}: the straggler made the run {slower:.2f}x longer")

# %% [markdown]
# What to look for in the table (the sentences below are computed from it):
#
# - **sync** waits every step for the slow rank: its time per step is the slow rank's compute
#   plus the allreduce (the cost model's `max_i compute_i + comm`, in the last columns).
# - **ps** never waits for anyone: the fast worker keeps pushing, so the *updates per second*
#   stay high - but those updates carry staler gradients (the `max stale` column).
# - **ssp** lets the fast worker run `s = 2` steps ahead and then makes it wait: with a
#   *persistent* straggler it ends up at the slow rank's pace like sync; it only absorbs delays
#   shorter than `s` steps.
# - **local-sgd** waits only every `H = 4` steps, so it loses less than sync to a slow rank.

# %%
slow_sync = walls[("sync", True)] / walls[("sync", False)]
slow_ps = walls[("ps", True)] / walls[("ps", False)]
print(f"On this machine the straggler cost synchronous training {slow_sync:.2f}x its time and "
      f"the parameter server {slow_ps:.2f}x: "
      + ("asynchronous training won time back." if slow_ps < slow_sync else
         "no time was won back this run (on a loaded 2-core machine the ranks also share "
         "the cores, so a sleeping straggler frees CPU for the others)."))

# %% [markdown]
# **Try:** rerun with `"--straggler", "1:1"` (no straggler) and `"1:6"`: the sync slowdown
# should track the factor, the parameter server's should not.

# %% [markdown]
# ## 4. Break it
#
# A replay order must give each worker pull, push, pull, push... A hurried order that pushes
# before pulling is refused before any message moves:

# %%
try:
    run_threads(lambda c: run_parameter_server(c, x0.copy(), grad_fn, 1, 0.5,
                                               order=[("push", 0), ("pull", 0),
                                                      ("pull", 1), ("push", 1)]), 3)
except CommError as exc:
    print("CommError:", exc)

# %% [markdown]
# ## 5. Why the largest runs are synchronous anyway
#
# GPT-3, PaLM, Llama: all trained synchronously. The reasons are the ones measured above, at
# scale: a stale gradient is a worse gradient (more steps to the same loss, and instability at
# the large learning rates that big batches need), a synchronous run is reproducible (the same
# bits every time - what the tests of this project rely on), and the hardware of one job is
# homogeneous, so stragglers are rare and handled another way: a slow or dead node is replaced
# from spares and the job restarts from a checkpoint, and Chen et al. (2016) simply drop the
# last few gradients of each step ("backup workers"). Asynchrony survives where devices really
# differ (federated learning, Hogwild on one shared-memory machine) and in between, as local
# SGD's infrequent averaging.
#
# **Try:** in section 2, set `WORKERS = 4` and staleness up to 3: the damage of staleness
# depends on how many updates are in flight, which grows with the number of workers.
