"""Mixed precision: which dtype each tensor has, and why, in one place.

``--precision fp32|fp64`` runs everything in that dtype, as minipar always did. ``bf16`` and
``fp16`` are the mixed precision of Micikevicius et al. 2018 ("Mixed Precision Training"), the
recipe Megatron-LM, DeepSpeed and PyTorch AMP follow and ZeRO's memory formula assumes
(Rajbhandari et al. 2019: 2 + 2 + 12 = 16 bytes per parameter):

    tensor                                    dtype      bytes/param   why
    working weights (Param.data)              16-bit     2             the GEMMs read them
    gradients (Param.grad, the flat buffer)   16-bit     2             the GEMMs write them
    master weights + AdamW m, v               fp32       4 + 4 + 4     small updates lr*g vanish
                                                                       when added to a 16-bit w
    activations between layers, on the wire   16-bit     -             half the bytes to store
                                                                       and to send (tp, pp)

and fp32 where the numerics demand it:

- **inside every kernel** (``fp32_math``): a kernel given 16-bit arrays computes in fp32 and
  rounds its outputs to 16 bits once. For a GEMM that is exactly what a tensor core does
  (16-bit inputs, fp32 accumulation, 16-bit output); for softmax, LayerNorm's mean and
  variance, GELU's tanh and every sum over tokens (dW, db) it keeps the long reductions in fp32.
  (On a CPU it is also the fast way: NumPy multiplies float16 matrices without BLAS.)
- **the loss**: cross-entropy's log-sum-exp over the vocabulary is computed in fp32
  (``float32``), and so are its three small tp allreduces.
- **gradient accumulation across microbatches**: with more than one microbatch the flat gradient
  buffer is fp32 (Megatron's ``main_grad``), so that m small 16-bit contributions are not each
  rounded into a 16-bit running sum; ZeRO's 2 bytes of gradient become 4 (``grad_dtype``).
- **the dp gradient reduction** is done in the gradient buffer's dtype: 16 bits with one
  microbatch. The bytes on the wire halve, which is the point of 16-bit training at scale; each
  add of a reduction is computed in fp32 and rounded once (as NCCL does), so the error is one
  16-bit rounding per rank summed, far below the noise of SGD. The global [loss, grad_sq]
  allreduce stays in float64, and grad_sq is summed in fp32 from the 16-bit gradients, so an
  overflow is seen as inf, not made by squaring.

fp16 has 5 exponent bits: gradients below 2^-24 flush to zero, so the loss is multiplied by a
*loss scale* before backward and the gradients divided by it (in fp32) before the update.
``LossScaler`` is the dynamic rule: double after ``growth_interval`` clean steps, halve and skip
the step when a gradient overflowed. bf16 has fp32's 8 exponent bits and needs no scaling.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import ml_dtypes  # registers bfloat16 with NumPy (np.dtype("bfloat16") works after this)
import numpy

from minipar import backend

PRECISIONS = ("fp32", "fp64", "bf16", "fp16")
DTYPE_OF = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}
PRECISION_OF_DTYPE = {"float32": "fp32", "float64": "fp64"}  # the old --dtype values
BFLOAT16 = numpy.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Policy:
    """The dtype of every kind of tensor in a run (see the module doc for the why)."""

    name: str  # fp32, fp64, bf16 or fp16

    @property
    def dtype(self) -> str:
        """Working weights, activations, activation gradients: what the layers see."""
        return DTYPE_OF[self.name]

    @property
    def mixed(self) -> bool:
        """16-bit working copy with fp32 master weights and optimizer state."""
        return self.name in ("bf16", "fp16")

    @property
    def master_dtype(self) -> str:
        """Master weights and optimizer state: fp32 under mixed precision, else ``dtype``."""
        return "float32" if self.mixed else self.dtype

    def grad_dtype(self, microbatches: int = 1) -> str:
        """The gradient buffer: 16-bit with one microbatch, fp32 when microbatches accumulate."""
        if self.mixed and microbatches > 1:
            return "float32"
        return self.dtype

    @property
    def loss_scaling(self) -> bool:
        """fp16 only: bf16 has fp32's exponent range, so its gradients do not underflow."""
        return self.name == "fp16"

    @property
    def itemsize(self) -> int:
        return numpy.dtype(self.dtype).itemsize

    def state_bytes(self, optimizer_states: int) -> int:
        """Optimizer bytes per parameter: K states (AdamW m, v: 2), plus the fp32 master copy
        under mixed precision. AdamW in bf16/fp16: 4 + 4 + 4 = ZeRO's 12."""
        per = numpy.dtype(self.master_dtype).itemsize
        return per * (optimizer_states + (1 if self.mixed else 0))


def policy(name: str) -> Policy:
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return Policy(name)


def policy_of_dtype(dtype) -> Policy:
    """The policy whose working dtype is ``dtype`` (the model's Param.data dtype)."""
    name = {v: k for k, v in DTYPE_OF.items()}[numpy.dtype(dtype).name]
    return Policy(name)


# -- fp32 math inside the kernels --------------------------------------------------------------

def is_16bit(dtype) -> bool:
    """A 16-bit float (bfloat16 or float16): stored in 16 bits, computed in fp32."""
    dtype = numpy.dtype(dtype) if not hasattr(dtype, "itemsize") else dtype
    return dtype.itemsize == 2 and (dtype == BFLOAT16 or dtype.kind == "f")


def _storage_dtype(values) -> object | None:
    """The 16-bit dtype among ``values`` (arrays, possibly in tuples), or None."""
    for v in values:
        if isinstance(v, tuple):
            found = _storage_dtype(v)
            if found is not None:
                return found
        elif hasattr(v, "dtype") and is_16bit(v.dtype):
            return v.dtype
    return None


def _up(v, widened: dict):
    """``v`` with 16-bit arrays widened to fp32; ``widened`` maps id(fp32 copy) -> original."""
    if isinstance(v, tuple):
        return tuple(_up(x, widened) for x in v)
    if hasattr(v, "dtype") and is_16bit(v.dtype):
        wide = from_float16(v) if v.dtype == numpy.float16 else v.astype(numpy.float32)
        widened[id(wide)] = v
        return wide
    return v


def _down(v, dtype, widened: dict):
    """``v`` with fp32 arrays rounded to ``dtype``; a widened input comes back as the original
    (a cache that keeps its input keeps the 16-bit array it was given, not a new copy)."""
    if isinstance(v, tuple):
        return tuple(_down(x, dtype, widened) for x in v)
    if id(v) in widened:
        return widened[id(v)]
    if hasattr(v, "dtype") and v.dtype == numpy.float32:
        return to_float16(v) if dtype == numpy.float16 else v.astype(dtype)
    return v


FP16_TINY = 2.0 ** -14  # float16's smallest normal; below it come its subnormals, steps of 2^-24


def to_float16(x):
    """float32 ``x`` rounded to float16, bit for bit ``x.astype(float16)``, but fast.

    NumPy converts a float32 whose float16 is subnormal (|x| < 2^-14) about 25x slower than
    any other (measured: 99 against 3.7 ms per million values). Softmax probabilities and small
    gradients land there all the time, which made an fp16 step several times slower than a
    bf16 one. Below 2^-14 a float16 is k * 2^-24 with k < 1024 in its low bits, so its bits
    are round-half-even(|x| * 2^24) (exact in float32: a power-of-two scaling) and the sign;
    a k that rounds up to 1024 is the bit pattern of 2^-14 itself, so the boundary needs no
    case of its own. Everything else goes through NumPy's conversion, which is fast there."""
    if backend.xp() is not numpy or _tiny_share(x) < 0.02:  # a GPU has no slow
        return x.astype(numpy.float16)  # path; and with few such values the detour costs more
    return float16_by_bits(x)


def float16_by_bits(x):
    """``to_float16``'s detour, taken whatever the values: NumPy's conversion for the values
    in float16's normal range (and inf, NaN), the bits written directly below it."""
    xp = backend.xp()
    flat = x.reshape(-1)
    mag = xp.abs(flat)
    tiny = (mag < FP16_TINY) & (mag > 0)  # zeros, like NaN, are quick for NumPy: they stay
    where = xp.flatnonzero(tiny)
    out = xp.where(tiny, xp.float32(0), flat).astype(numpy.float16)
    small = flat[where]
    k = xp.rint(xp.abs(small) * xp.float32(2.0 ** 24)).astype(xp.uint16)
    out.view(xp.uint16)[where] = k | (xp.signbit(small).astype(xp.uint16) << xp.uint16(15))
    return out.reshape(x.shape)


def fp32_math(kernel):
    """A kernel that, given 16-bit arrays, computes in fp32 and returns 16-bit arrays.

    16-bit inputs (also inside tuples: a backward's cache) are widened to fp32; the kernel runs
    unchanged; its fp32 outputs (also inside tuples: a forward's cache) are rounded once to the
    16-bit dtype. In fp32 or fp64 the kernel is called as is: no copy, the same bits."""

    @functools.wraps(kernel)
    def wrapped(*args, **kwargs):
        dtype = _storage_dtype(args)
        if dtype is None:
            return kernel(*args, **kwargs)
        widened: dict = {}
        wide_args = _up(args, widened)  # kept alive, so the ids in ``widened`` stay unique
        return _down(kernel(*wide_args, **kwargs), dtype, widened)

    return wrapped


@functools.cache
def _half_table():
    """The float32 value of every float16 bit pattern (65536 values, 256 KiB)."""
    return numpy.arange(1 << 16, dtype=numpy.uint32).astype(numpy.uint16) \
        .view(numpy.float16).astype(numpy.float32)


def from_float16(h):
    """float16 ``h`` widened to float32, bit for bit ``h.astype(float32)``, but fast.

    The way back has the same slow path (measured: 25 against 3.4 ms per million values when
    the halves are subnormal). With only 2^16 halves, a table of their float32 values indexed
    by the bits takes about 5 ms per million values whatever they are. On a GPU (CuPy) the
    conversion has no slow path, so this is the NumPy backend's only; and where few values
    are subnormal NumPy's own conversion is faster (``_tiny_share``)."""
    if backend.xp() is not numpy or _tiny_share(h) < 0.06:
        return h.astype(numpy.float32)
    return float32_by_table(h)


def float32_by_table(h):
    """``from_float16``'s detour, taken whatever the values: the table lookup."""
    return _half_table()[h.view(numpy.uint16)]


SAMPLE_STRIDE = 61  # a prime, so the sample does not follow a head's or a row's width


def _tiny_share(x) -> float:
    """The share of all ``x``'s values that are nonzero and below float16's normal range,
    estimated from every SAMPLE_STRIDE-th value (0 for arrays too small to gain from a detour).
    Zeros do not count: NumPy converts them quickly, and causal attention's masked
    probabilities are half of its probabilities. The share only chooses between two
    conversions that give the same bits, so an estimate is enough. Break-even points measured
    on 86,000 values: about 2% of such values rounding down, 6% widening."""
    if x.size < 64 * SAMPLE_STRIDE:
        return 0.0
    mag = abs(x.flat[::SAMPLE_STRIDE].astype(numpy.float32))  # the sample only, no full copy
    return float(((mag < FP16_TINY) & (mag > 0)).mean())


def float32(x):
    """``x`` widened to fp32 if it is 16-bit (the loss is computed in fp32), else ``x``."""
    if x.dtype == numpy.float16:
        return from_float16(x)
    return x.astype(numpy.float32) if is_16bit(x.dtype) else x


def sum_fp32(x, axis):
    """``x.sum(axis)`` accumulated in fp32 when ``x`` is 16-bit, returned in ``x``'s dtype: a sum
    over every token in 16 bits would lose the small terms."""
    if not is_16bit(x.dtype):
        return x.sum(axis=axis)
    return x.sum(axis=axis, dtype=numpy.float32).astype(x.dtype)


def square_sum(g) -> float:
    """sum(g * g) as a Python float, squared in fp32 for a 16-bit ``g`` (in fp16 the square of a
    gradient above 256 would overflow by itself; only a real overflow may make it inf)."""
    g = float32(g)
    return float((g * g).sum())


# -- dynamic loss scaling ----------------------------------------------------------------------

@dataclass
class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018, section 3.2): the loss is multiplied by
    ``scale`` before backward; after a step whose gradients overflowed (a non-finite global
    grad_sq, which the one world allreduce makes the same on every rank), the step is skipped
    and the scale halves; after ``growth_interval`` clean steps in a row, it doubles.

    ``enabled=False`` (fp32, fp64, bf16) keeps ``scale`` at 1 and never skips."""

    enabled: bool = False
    scale: float = 2.0 ** 16  # the usual start: large, and quickly halved if too large
    growth_interval: int = 200  # clean steps before the scale doubles
    clean_steps: int = 0  # clean steps since the last change
    skipped: int = 0  # steps skipped for overflow so far

    def __post_init__(self) -> None:
        if not self.enabled:
            self.scale = 1.0

    def update(self, finite: bool) -> bool:
        """Record a step's outcome; returns True when the step must be skipped."""
        if not self.enabled:
            return False
        if not finite:
            self.scale = max(self.scale / 2.0, 2.0 ** -24)
            self.clean_steps = 0
            self.skipped += 1
            return True
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0
        return False

    def describe(self) -> str:
        if not self.enabled:
            return "no loss scaling"
        return (f"loss scale {self.scale:g} (dynamic: x2 after {self.growth_interval} clean "
                f"steps, /2 and skip on overflow)")


def schedule(outcomes, scale: float, growth_interval: int) -> list[tuple[float, bool]]:
    """(scale used, skipped) per step for a list of step outcomes (True = finite): the rule of
    ``LossScaler`` written out again as a closed loop, for tests and the lesson."""
    out, clean = [], 0
    for finite in outcomes:
        out.append((scale, not finite))
        if not finite:
            scale, clean = max(scale / 2, 2.0 ** -24), 0
        else:
            clean += 1
            if clean == growth_interval:
                scale, clean = scale * 2, 0
    return out


def format_range(name: str) -> dict:
    """Exponent/mantissa bits, largest, smallest normal and machine epsilon of a format."""
    info = ml_dtypes.finfo(BFLOAT16) if name == "bf16" else numpy.finfo(DTYPE_OF[name])
    return {"bits": numpy.dtype(DTYPE_OF[name]).itemsize * 8, "exponent": int(info.nexp),
            "mantissa": int(info.nmant), "max": float(info.max),
            "tiny": float(info.smallest_normal), "eps": float(info.eps),
            "decimal_digits": round(-math.log10(float(info.eps)), 1)}


__all__ = ["PRECISIONS", "DTYPE_OF", "PRECISION_OF_DTYPE", "Policy", "policy", "policy_of_dtype",
           "is_16bit", "fp32_math", "float32", "sum_fp32", "square_sum", "LossScaler",
           "schedule", "format_range", "BFLOAT16"]
