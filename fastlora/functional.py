"""fastlora.lora_linear: the fused LoRA linear op, with its input checks."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import ops
from .backend import select_backend
from .dropout import new_seed

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # the ops' x dtypes; float64: gradcheck, oracles
_HALF = (torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out):
    """Validate arguments; raise TypeError/ValueError naming the argument and what was expected.

    Returns (N, K, r). Called on every lora_linear call: the common case passes with a few attribute reads
    (host time per call is a cost users pay on every layer), the messages are built only on failure.
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    xs, dt = x.shape, x.dtype
    if not xs:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {dt}")
    ws = weight.shape
    if len(ws) != 2:
        raise ValueError(f"weight must be 2-D, got shape {_shape(weight)}")
    K = xs[-1]
    N, Kw = (ws[1], ws[0]) if fan_in_fan_out else ws
    if Kw != K:
        layout = "(in_features, out_features) with fan_in_fan_out=True" if fan_in_fan_out \
            else "(out_features, in_features)"
        raise ValueError(f"weight must have shape {layout} with in_features = x.shape[-1] = {K}, "
                         f"got {_shape(weight)}")
    if weight.dtype != dt:
        raise TypeError(f"weight must have x's dtype {dt}, got {weight.dtype}: cast x to {weight.dtype} "
                        f"(x.to({weight.dtype})), or run the call inside torch.autocast (which casts every operand "
                        f"to its dtype, as it does for nn.Linear)")
    As, Bs = lora_A.shape, lora_B.shape
    if len(As) != 2 or len(Bs) != 2:
        raise ValueError(f"lora_A must be (r, {K}) and lora_B ({N}, r); got lora_A {_shape(lora_A)}, "
                         f"lora_B {_shape(lora_B)}")
    r = As[0]
    if r < 1:
        raise ValueError(f"lora_A must be (r, {K}) with r >= 1, got {_shape(lora_A)}")
    if As[1] != K:
        raise ValueError(f"lora_A must have shape (r, {K}) (in_features = x.shape[-1]), got {_shape(lora_A)}")
    if Bs[0] != N or Bs[1] != r:
        raise ValueError(f"lora_B must have shape ({N}, {r}) (out_features, r), got {_shape(lora_B)}")
    ad = lora_A.dtype
    if ad != lora_B.dtype or not (ad == dt or (ad == torch.float32 and dt in _HALF)):
        want = f"x's ({dt})" + (" or float32" if dt in _HALF else "")
        raise TypeError(f"lora_A and lora_B must share one dtype, {want}; got {ad} and {lora_B.dtype}")
    dev = x.device
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},) (out_features), got {_shape(bias)}")
        if not (bias.dtype == dt or (bias.dtype == torch.float32 and dt in _HALF)):
            raise TypeError(f"bias must have x's dtype {dt}" + (" or float32" if dt in _HALF else "")
                            + f", got {bias.dtype}")
        if bias.device != dev:
            dev = None
    if dev is None or weight.device != dev or lora_A.device != dev or lora_B.device != dev:
        devices = {t.device for t in (x, weight, lora_A, lora_B, bias) if t is not None}
        raise ValueError(f"x, weight, bias, lora_A and lora_B must be on one device, got {sorted(map(str, devices))}")
    if type(scaling) is float or type(scaling) is int:
        if not torch.compiler.is_compiling() and not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
    elif isinstance(scaling, Tensor):
        if scaling.numel() != 1 or scaling.dim() > 1:
            raise ValueError(f"scaling must be a float or a one-element tensor (0-d or shape (1,)), got shape {_shape(scaling)}")
        # value checks read the tensor: skipped while torch.compile traces (no data-dependent branch)
        if scaling.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.isfinite(scaling).all():
            raise ValueError(f"scaling must be finite, got {scaling.item()}")
    elif isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        if not torch.compiler.is_compiling() and not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
    else:
        raise TypeError(f"scaling must be a float or a one-element tensor (0-d or shape (1,)), got {type(scaling).__name__}")
    if not (type(dropout_p) is float or (isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool))) \
            or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return N, K, r


_CONSTANTS: dict = {}


def cached_tensor(key: tuple, make) -> Tensor:
    """``make()``'s tensor, made once per ``key`` and never written: a float scaling, the unused seed, a
    multi-adapter dropout or lookup table cost no allocation or host-to-device copy per call (and a captured CUDA
    graph keeps reading the same tensor). Made outside inference mode, so a training call may save it for
    backward. While torch.compile traces, made inline (a graph constant: a cache would be guarded on)."""
    if torch.compiler.is_compiling():
        return make()
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        with torch.inference_mode(False):
            t = _CONSTANTS[key] = make()
    return t


def _constant(value, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-d tensor of ``value`` (see cached_tensor)."""
    return cached_tensor(("scalar", value, dtype, torch.device(device)),
                         lambda: torch.full((), value, dtype=dtype, device=device))


def op_scalars(x: Tensor, scaling, dropout_p, training: bool, seed, *, scale_dtype: torch.dtype | None = None,
               host_rng: bool = False, float_scale: bool = False):
    """(p, scale, seed) as the ops take them: the dropout probability in effect (0 unless training), the scaling
    as a 0-d tensor on x's device (fp32; fp64 for fp64 x; cached for a float), and the seed as a 0-d int64
    tensor (drawn from torch's generator when p > 0 and none is given; a cached zero otherwise).

    For an eager call on the CPU torch path: ``host_rng``: its mask is drawn by torch code (fastlora.dropout), so
    with no seed given none is drawn (None) and the mask comes from torch's default generator itself, as
    nn.Dropout's; ``float_scale``: the scaling becomes a Python float (an alpha for the GEMMs, no tensor op; the
    GEMMs round it to their dtype, as the 0-d tensor would be)."""
    p = float(dropout_p) if training else 0.0
    if float_scale and (not isinstance(scaling, Tensor) or scaling.device.type == "cpu"):
        scale = float(scaling)                   # a CPU tensor is read on the host: no sync
    elif isinstance(scaling, Tensor):
        sdt = scale_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
        scale = scaling.detach().reshape(()).to(device=x.device, dtype=sdt)
    else:
        sdt = scale_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
        scale = _constant(float(scaling), sdt, x.device)
    if p > 0:
        if seed is not None:
            seed_t = torch.as_tensor(seed, dtype=torch.int64, device=x.device)
        else:
            seed_t = None if host_rng else new_seed(x.device)
    else:
        seed_t = None if host_rng else _constant(0, torch.int64, x.device)
    return p, scale, seed_t


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float | Tensor, dropout_p: float = 0.0, training: bool = True,
                fan_in_fan_out: bool = False, *, seed: int | Tensor | None = None,
                backend: str | None = None, deterministic: bool | None = None) -> Tensor:
    """y = x·Wᵀ + bias + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ, fused.

    Args:
        x: (..., K) float32/float16/bfloat16 (float64 too, for gradcheck and oracles), any strides.
        weight: frozen base weight, (N, K); (K, N) when ``fan_in_fan_out`` (GPT-2 Conv1D), read
            through strides, never copied. Same dtype as x.
        bias: (N,) or None; gets a gradient when it requires one.
        lora_A: (r, K); lora_B: (N, r). x's dtype, or float32 on a half base (PEFT's default).
        scaling: alpha/r (or alpha/sqrt(r)); a float or 0-d tensor, a runtime value (no recompiles).
        dropout_p: LoRA dropout on the adapter input, in [0, 1); applied only when ``training``.
        seed: dropout seed (int or 0-d int tensor): the same seed gives the same mask on the same
            backend and device. The Triton kernels draw a counter-based Philox mask of (seed, row, col),
            regenerated in backward, never stored; the CPU torch path draws u = torch.rand ≥ p from a
            generator seeded with it and keeps the mask bit-packed (1/32 of an fp32 x) in eager training.
            CPU and GPU masks differ for one seed (as PEFT's do). Default: torch's generator on x's
            device draws the seed (or, on the CPU torch path, the mask itself, as nn.Dropout), so
            torch.manual_seed makes runs repeatable.
        backend: "auto" (default), "triton" or "torch"; see fastlora.backend.
        deterministic: backward without atomics (split reductions), bitwise repeatable. Default:
            torch.are_deterministic_algorithms_enabled().

    Returns (..., N) in x's dtype; accumulation in float32, rounded once.
    """
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, seed, backend,
                        deterministic)


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, seed=None,
                 backend=None, deterministic=None):
    """lora_linear without check_inputs, for callers whose tensors are known to fit: a module's own parameters
    (checked when it was built) or a patched layer's (checked at patch time), x checked by the caller. Host time
    per call is what a small layer costs, and every line counts there."""
    dev = x.device
    be = select_backend(dev, backend)                      # once per call: "torch" or "triton"
    compiling = torch.compiler.is_compiling()
    host = be == "torch" and dev.type == "cpu" and not compiling
    p, scale, seed_t = op_scalars(x, scaling, dropout_p, training, seed, host_rng=host, float_scale=host)
    save_s = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                          or weight.requires_grad or (bias is not None and bias.requires_grad))
    if deterministic is None:      # shapes the kernels' backward only (the torch path's is deterministic anyway)
        deterministic = not host and torch.are_deterministic_algorithms_enabled()
    if compiling:                                          # torch.compile traces the custom op
        y, _ = ops.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, p, seed_t, fan_in_fan_out,
                                   save_s, bool(deterministic), be)
        return y
    if not save_s:
        # inference in eager mode: no graph to record, so the op's dispatcher / autograd layers are skipped
        return ops.forward(x, weight, bias, lora_A, lora_B, scale, p, seed_t, fan_in_fan_out, False, be)[0]
    # eager training: a plain autograd.Function over the same forward / backward (no dispatcher layers)
    return ops.LoraFunction.apply(x, weight, bias, lora_A, lora_B,
                                  (scale, p, seed_t, fan_in_fan_out, bool(deterministic), be))
