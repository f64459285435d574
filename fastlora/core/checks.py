"""What every op checks and shares: input validation, the op scalars, one name per layout rule.

    check_inputs(x, W, bias, A, B, scaling, dropout_p, fan_in_fan_out) -> (N, K, r)
    op_scalars(x, scaling, dropout_p, training, seed) -> (p, scale, seed) as the ops take them
    weight_nk(W, fan_in_fan_out)   W0 as (N, K) (a GPT-2 Conv1D stores it (K, N))
    acc_dtype(dtype)               the accumulator / S dtype: float32, float64 for float64
    is_conv1d(layer)               transformers' Conv1D (weight stored (in, out))
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..kernels._layout import acc_dtype, weight_nk  # noqa: F401 - one definition, shared with the kernels
from .dropout import new_seed

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # the ops' x dtypes; float64: gradcheck, oracles
_HALF = (torch.float16, torch.bfloat16)


def weight_grad(dy: Tensor, x: Tensor, fan_in_fan_out: bool, dtype: torch.dtype) -> Tensor:
    """dW = dYᵀ·x in the stored layout of W (``dtype``), for a base weight that requires grad (not what LoRA is
    for, but answered correctly, by a plain matmul)."""
    g = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)      # (N, K)
    return weight_nk(g, fan_in_fan_out).to(dtype)


def is_conv1d(layer) -> bool:
    """transformers' GPT-2 Conv1D (weight stored (in_features, out_features): fan_in_fan_out)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "nx")


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

    For an eager call on the CPU torch path: ``host_rng``: its mask is drawn by torch code (fastlora.core.dropout), so
    with no seed given none is drawn (None) and the mask comes from torch's default generator itself, as
    nn.Dropout's; ``float_scale``: the scaling becomes a Python float (an alpha for the GEMMs, no tensor op; the
    GEMMs round it to their dtype, as the 0-d tensor would be)."""
    p = float(dropout_p) if training else 0.0
    if float_scale and (not isinstance(scaling, Tensor) or scaling.device.type == "cpu"):
        scale = float(scaling)                   # a CPU tensor is read on the host: no sync
    elif isinstance(scaling, Tensor):
        sdt = scale_dtype or acc_dtype(x.dtype)
        scale = scaling.detach().reshape(()).to(device=x.device, dtype=sdt)
    else:
        sdt = scale_dtype or acc_dtype(x.dtype)
        scale = _constant(float(scaling), sdt, x.device)
    if p > 0:
        if seed is not None:
            seed_t = torch.as_tensor(seed, dtype=torch.int64, device=x.device)
        else:
            seed_t = None if host_rng else new_seed(x.device)
    else:
        seed_t = None if host_rng else _constant(0, torch.int64, x.device)
    return p, scale, seed_t
