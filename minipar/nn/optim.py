"""Optimizers, gradient clipping and the learning-rate schedule.

The update rules are functions on arrays (``adamw_update``, ``sgd_update``) so that ZeRO can apply
exactly the same arithmetic to a rank's flat shard of the parameters as the unsharded optimizer
applies to whole tensors: the sharded run then equals the serial one number for number.
"""

from __future__ import annotations

import math

from minipar import backend
from minipar.nn import threads
from minipar.nn.precision import float32, square_sum


def adamw_update(p, g, m, v, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay, step: int) -> None:
    """One AdamW step in place (Loshchilov & Hutter 2019: decay decoupled from the gradient).

    ``weight_decay`` is a float or an array broadcastable to ``p`` (0 where decay is off).

    Plain form:  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
                 p -= lr (m / bias1 / (sqrt(v / bias2) + eps) + weight_decay p).
    Contiguous arrays are updated a slice at a time on the worker threads
    (``minipar.nn.threads``): the same operations in the same order, element by element, so the
    result is bit for bit the one-call result, and each slice's dozen passes find it in cache."""
    xp = backend.xp()
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    args = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, bias1=bias1, bias2=bias2)
    arrays = (p, g, m, v)
    decay_array = hasattr(weight_decay, "shape")
    if decay_array:
        arrays += (weight_decay,)
    if backend.name() != "numpy" or any(
            a.shape != p.shape or not a.flags.c_contiguous for a in arrays):
        _adamw_slice(p, g, m, v, weight_decay, xp.empty_like(p), xp.empty_like(p), **args)
        return
    flat = [a.reshape(-1) for a in arrays]
    # 1 MiB of float32 per array: large slices keep the ~15 NumPy calls per slice cheap beside
    # their work (the small preset's update: 32 ms at 2^14 elements, 16 ms at 2^18)
    block = 1 << 18

    def rows(r):
        wd = flat[4][r] if decay_array else weight_decay
        tmp, upd = xp.empty(r.stop - r.start, p.dtype), xp.empty(r.stop - r.start, p.dtype)
        _adamw_slice(flat[0][r], flat[1][r], flat[2][r], flat[3][r], wd, tmp, upd, **args)

    threads.map_rows(rows, p.size, p.size, block)


def _adamw_slice(p, g, m, v, weight_decay, tmp, upd, *, lr, beta1, beta2, eps, bias1,
                 bias2) -> None:
    """adamw_update's arithmetic on one slice, with two scratch arrays of its size."""
    xp = backend.xp()
    m *= beta1
    xp.multiply(1.0 - beta1, g, out=tmp)
    m += tmp
    v *= beta2
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp
    xp.divide(m, bias1, out=upd)
    xp.divide(v, bias2, out=tmp)
    xp.sqrt(tmp, out=tmp)
    tmp += eps
    upd /= tmp
    xp.multiply(weight_decay, p, out=tmp)
    upd += tmp
    upd *= lr
    p -= upd


def sgd_update(p, g, buf, *, lr: float, momentum: float, weight_decay, step: int) -> None:
    """SGD with heavy-ball momentum and decoupled weight decay, in place."""
    if momentum:
        buf *= momentum
        buf += g
        g = buf
    p -= lr * (g + weight_decay * p)


def master_step(rule, data, grad, state: dict, factor: float, lr: float, wd: float) -> None:
    """Mixed precision's update (Micikevicius et al. 2018): the gradient is widened to fp32 and
    multiplied by ``factor`` (1 / loss scale, times the clipping factor) there, where a small
    gradient cannot flush to zero; ``rule`` updates the fp32 master copy ``state["master"]``
    with the fp32 state; the 16-bit working copy ``data`` is the master rounded once."""
    g = float32(grad)
    if factor != 1.0:
        g = g * factor
    master = state["master"]
    rule._update(master, g, state, lr, wd)
    data[...] = master.astype(data.dtype)


class Optimizer:
    """Keeps per-parameter state keyed by parameter name, so checkpoints are layout-independent.

    With ``master`` (mixed precision, ``minipar.nn.precision``) the state is fp32 and holds a
    fp32 master copy of each 16-bit parameter ("master"); ``scale_grads`` then only records
    ``grad_factor``, applied in fp32 at the next step."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr: float, weight_decay: float = 0.0, master: bool = False):
        self.params = list(params)
        self.lr = lr
        self.weight_decay = weight_decay
        self.step_count = 0
        self.master = master
        self.grad_factor = 1.0  # unscale and clip, applied to the fp32 gradient (master only)
        self.state = {p.name: self._new_state(p.data) for p in self.params}

    def _new_state(self, data) -> dict:
        xp = backend.xp()
        if not self.master:
            return {k: xp.zeros_like(data) for k in self.state_names}
        state = {k: xp.zeros(data.shape, dtype="float32") for k in self.state_names}
        state["master"] = data.astype("float32")  # the 16-bit initial weights, exactly
        return state

    def step(self, lr: float | None = None) -> None:
        self.step_count += 1
        lr = self.lr if lr is None else lr
        for p in self.params:
            if p.grad is None:
                continue
            wd = self.weight_decay if p.decay else 0.0
            if self.master:
                master_step(self, p.data, p.grad, self.state[p.name], self.grad_factor, lr, wd)
            else:
                self._update(p.data, p.grad, self.state[p.name], lr, wd)
        self.grad_factor = 1.0

    def _update(self, data, grad, state, lr, wd) -> None:
        raise NotImplementedError

    def state_bytes(self) -> int:
        return sum(int(a.nbytes) for s in self.state.values() for a in s.values())


class AdamW(Optimizer):
    state_names = ("m", "v")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, master: bool = False):
        super().__init__(params, lr, weight_decay, master)
        self.betas = betas
        self.eps = eps

    def _update(self, data, grad, state, lr, wd) -> None:
        adamw_update(data, grad, state["m"], state["v"], lr=lr, beta1=self.betas[0],
                     beta2=self.betas[1], eps=self.eps, weight_decay=wd, step=self.step_count)


class SGD(Optimizer):
    state_names = ("momentum",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 master: bool = False):
        super().__init__(params, lr, weight_decay, master)
        self.momentum = momentum

    def _update(self, data, grad, state, lr, wd) -> None:
        sgd_update(data, grad, state["momentum"], lr=lr, momentum=self.momentum,
                   weight_decay=wd, step=self.step_count)


def make_optimizer(name: str, params, lr: float, weight_decay: float,
                   master: bool = False) -> Optimizer:
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay, master=master)
    if name == "sgd":
        return SGD(params, lr=lr, weight_decay=weight_decay, master=master)
    raise ValueError(f"--optimizer must be adamw or sgd, got {name!r}")


def local_grad_sq(params, tp_rank: int) -> float:
    """Sum of squared gradients this rank owns: a tp-replicated tensor counts on tp rank 0 only."""
    total = 0.0
    for p in params:
        if p.grad is None or (p.sharding is None and tp_rank != 0):
            continue
        total += square_sum(p.grad)
    return total


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor that scales gradients to a global norm of at most ``max_norm``."""
    if max_norm <= 0 or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to min_ratio x base.

    ``step`` counts from 0; the first step uses base_lr / warmup (never 0).
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
