"""LoRA on mixture-of-experts experts, fused: every expert's A_e, B_e trained without W_e + ΔW_e.

    out[t] = Σ_k w[t,k] · down_e( gate( gate_up_e(x[t]) ) )             e = top_k_index[t, k]
    proj_e(z) = z·W_eᵀ (+ b_e) + s·(drop(z)·A_eᵀ)·B_eᵀ                   (is_transposed: z·W_e, W_e (in, out))

transformers 5 keeps experts as 3-D stacks, gate_up_proj (E, 2I, H) and down_proj (E, H, I); PEFT's
``target_parameters`` puts one LoRA per expert on them, stored as ONE pair per projection:

    lora_A (E·r, in)    expert e = rows e·r … e·r + r − 1
    lora_B (out, E·r)   expert e = columns j·E + e, j < r          (rank-major: NOT the rows' order)

Every function here takes that layout (fastlora.integrations.moe_peft hands PEFT's Parameters over as they are). Inside,
B is copied into the bank layout of the multi-adapter kernels (expert e = columns e·r … e·r + r − 1; a copy
of out × E·r elements per call, tiny next to W) and dB is copied back: the expert index is the adapter id.

Per experts call (sections below, in this order):
  routing plan   plan_routing: the (token, k) slots sorted by expert on the device (no host sync), the slot
                 inputs gathered in that order, a multi-adapter BatchPlan over them (fastlora.ops.multi_plan), and
                 the segment bounds = the grouped GEMM's offsets.
  maths          torch_forward / torch_backward: one projection, per expert segment on the host's bounds (the
                 CPU backend and the readable statement: two small GEMMs for LoRA, the base GEMM added onto
                 the LoRA term in place with addmm_).
  dispatch       "triton": the base by a grouped GEMM (torch.nn.functional.grouped_mm, cuBLAS-backed on CUDA)
                 into y, then the multi-adapter gather shrink S = drop(x)·A_eᵀ and expand y += s·S·B_eᵀ
                 (ACCUMULATE: onto the grouped GEMM's output, rounded once); backward likewise (dx =
                 grouped dY·W_e, += dS·A_e; dA, dB by the per-expert gradient kernel). "torch": the maths.
  registration   custom ops fastlora::moe_linear_fwd / _bwd by core.registration.register_op (eager
                 and torch.compile alike).
  functional     lora_experts(x, top_k_index, top_k_weights, W_gate_up, W_down, gate, ...): plan, gather,
                 projection, the model's own activation (autograd), projection, routing weights (applied to
                 base and LoRA alike, autograd: the router keeps its gradient), back to token order, sum
                 over k in the weights' dtype, cast to x's (as transformers' grouped_mm experts).
                 experts_forward(module, ...): the same on a transformers experts module.
The module, LoraExperts (fastlora.nn.moe), is a transformers experts module + LoRA on its projections, with
dropout (fastlora.core.dropout's mask of each projection's input seen as (slots, in), slots in expert order: the
kernels' counter-based mask, on the CPU torch path a generator seeded with the seed).

Saved for backward per projection: its input (S, in) (S = T·K slots), S = drop(x)·A_eᵀ (S, r) float32 and the
seed; the activation, the routing weights' product and the gather keep what autograd keeps for them. Never an
E × out × in temporary: W_e is read in place, ΔW never formed.
"""
from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..core.backend import resolve_backend_choice, select_backend
from ..core.checks import _constant, cached_tensor
from ..core.dropout import draw_keep, new_seed
from ..core.registration import register_op
from .multi_plan import BatchPlan, _pieces, choose_regime

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kernels():
    from ..kernels import multi_lora    # lazily: Triton-only module
    return multi_lora


# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------

def bank_B(lora_B: Tensor, num_experts: int) -> Tensor:
    """PEFT's (out, E·r) B, expert e at columns j·E + e, as the bank's (out, E·r), expert e at columns e·r + j."""
    out, er = lora_B.shape
    return lora_B.reshape(out, er // num_experts, num_experts).transpose(1, 2).reshape(out, er)


def peft_B(bank: Tensor, num_experts: int) -> Tensor:
    """The inverse of bank_B."""
    out, er = bank.shape
    return bank.reshape(out, num_experts, er // num_experts).transpose(1, 2).reshape(out, er)


# ---------------------------------------------------------------------------
# routing plan (device ops only: sort, gather, the multi-adapter plan's searchsorted / cumsum)
# ---------------------------------------------------------------------------

class RoutingPlan:
    """The (token, k) slots of one experts call, sorted by expert (stable).

    perm (S,) int64: slot t·K + k of each sorted position · tok (S,) int64: its token · inv (S,) int64: the sorted
    position of each slot · slots: a BatchPlan over the sorted slots with the expert as the adapter id (its
    ``bounds`` (E+1,) int32 are the expert segments; ``bounds[1:]`` the grouped GEMM's offsets).
    """

    def __init__(self, top_k_index: Tensor, num_experts: int, regime: str = "auto"):
        T, K = top_k_index.shape
        ids = top_k_index.reshape(-1)
        if ids.numel():
            msg = f"top_k_index must hold expert indices in [0, {num_experts})"
            try:
                torch._assert_async(((ids >= 0) & (ids < num_experts)).all(), msg)
            except RuntimeError as e:
                raise ValueError(msg) from e
        sorted_ids, self.perm = torch.sort(ids, stable=True)
        self.tok = torch.div(self.perm, K, rounding_mode="floor")
        self.inv = torch.empty_like(self.perm).scatter_(0, self.perm, torch.arange(ids.numel(), device=ids.device))
        self.T, self.K, self.E, self.S = T, K, num_experts, ids.numel()
        regime = choose_regime(self.S, num_experts, regime)
        self.slots = BatchPlan(torch.cat(_pieces(sorted_ids.to(torch.int32), num_experts, regime)), (self.S,),
                               num_experts, regime)


def plan_routing(top_k_index: Tensor, num_experts: int, regime: str = "auto") -> RoutingPlan:
    """One experts call's routing plan (built once per call, shared by both projections)."""
    return RoutingPlan(top_k_index, num_experts, regime)


def host_segments(plan: BatchPlan) -> list[tuple[int, int, int]]:
    """[(expert, lo, hi)] of the non-empty expert segments: a host read (the CPU path, where it costs nothing)."""
    b = plan.bounds.tolist()
    return [(e, b[e], b[e + 1]) for e in range(len(b) - 1) if b[e + 1] > b[e]]


def _w_in_out(weight: Tensor, e: int, transposed: bool) -> Tensor:
    """Expert e's weight as (in, out): W_eᵀ (a view), or W_e itself when stored transposed (gpt-oss)."""
    return weight[e] if transposed else weight[e].t()


def _keep(seed, S: int, C: int, p: float, device) -> Optional[Tensor]:
    """None (no dropout) or the (S, C) float32 keep/(1−p) of the slot inputs (fastlora.core.dropout.draw_keep: on the
    CPU a generator seeded with ``seed``, on a GPU the kernels' counter-based mask)."""
    if p <= 0 or S == 0:
        return None
    return draw_keep(seed, S, C, p, torch.device(device), torch.float32).mul_(1.0 / (1.0 - p))


# ---------------------------------------------------------------------------
# the maths in plain torch: the CPU backend (per-expert segments, host-read bounds)
# ---------------------------------------------------------------------------

def torch_forward(x, weight, bias, lora_A, lora_B, scaling, plan, transposed, p, seed, save_s):
    """One projection over expert-sorted slots. x (S, in) · weight (E, out, in) or (E, in, out) · bias (E, out)
    or None · lora_A (E·r, in) / lora_B (out, E·r) (PEFT's layout) or None. Returns (y (S, out) in x's dtype,
    S (S, r) float32 = drop(x)·A_eᵀ — empty unless ``save_s``)."""
    E, n_slots = weight.shape[0], x.shape[0]
    out_f = weight.shape[2] if transposed else weight.shape[1]
    r = 0 if lora_A is None else lora_A.shape[0] // E
    y = x.new_empty((n_slots, out_f))
    Sv = x.new_empty((n_slots if save_s and r else 0, r), dtype=torch.float32)
    Bb = bank_B(lora_B, E) if r else None
    keep = _keep(seed, n_slots, x.shape[1], p, x.device) if r else None
    for e, lo, hi in host_segments(plan):
        xe, ye, wt = x[lo:hi], y[lo:hi], _w_in_out(weight, e, transposed)
        if not r:
            torch.mm(xe, wt, out=ye)
        else:                                   # anchored: the LoRA term first, the base GEMM added onto it
            cols = slice(e * r, (e + 1) * r)
            d = xe.to(lora_A.dtype) if keep is None else xe.to(lora_A.dtype) * keep[lo:hi].to(lora_A.dtype)
            Se = torch.mm(d, lora_A[cols].t())                              # (n, r)
            if save_s:
                Sv[lo:hi] = Se
            if Bb.dtype == y.dtype:
                torch.mm(Se * scaling, Bb[:, cols].t(), out=ye)
            else:                               # fp32 adapters on a half base: rounded once, then the base
                ye.copy_(torch.mm(Se * scaling, Bb[:, cols].t()))
            ye.addmm_(xe, wt)
        if bias is not None:
            ye.add_(bias[e])
    return y, Sv


def torch_backward(dy, x, weight, lora_A, lora_B, S, scaling, plan, transposed, p, seed,
                   needs_dx, needs_dA, needs_dB):
    """(dx (S, in), dA (E·r, in), dB (out, E·r) in PEFT's layout), None where not needed; S from the forward.
    dS = s·dY_e·B_e · dB_e = s·dY_eᵀ·S_e · dA_e = dS_eᵀ·drop(x_e) · dx_e = (dS_e·A_e)⊙keep + dY_e·W_e."""
    E, n_slots = weight.shape[0], x.shape[0]
    r = 0 if lora_A is None else lora_A.shape[0] // E
    dx = torch.empty_like(x) if needs_dx else None
    dA = torch.zeros_like(lora_A) if needs_dA and r else None
    dBt = lora_B.new_zeros((lora_B.shape[1], lora_B.shape[0])) if needs_dB and r else None   # bank layout, ᵀ
    Bb = bank_B(lora_B, E) if r and (needs_dx or needs_dA) else None
    keep = _keep(seed, n_slots, x.shape[1], p, x.device) if r and (needs_dx or needs_dA) else None
    for e, lo, hi in host_segments(plan):
        dye, xe = dy[lo:hi], x[lo:hi]
        lx = None
        if r:
            cols = slice(e * r, (e + 1) * r)
            ad = lora_A.dtype
            dyl = dye.to(ad)
            if dBt is not None:
                torch.mm(S[lo:hi].to(ad).t(), dyl, out=dBt[cols]).mul_(scaling)
            if needs_dx or needs_dA:
                dSe = torch.mm(dyl, Bb[:, cols]).mul_(scaling)                  # (n, r)
                if needs_dA:
                    d = xe.to(ad) if keep is None else xe.to(ad) * keep[lo:hi].to(ad)
                    torch.mm(dSe.t(), d, out=dA[cols])
                if needs_dx:
                    lx = torch.mm(dSe, lora_A[cols])
                    if keep is not None:
                        lx.mul_(keep[lo:hi].to(ad))
        if needs_dx:
            w_out_in = _w_in_out(weight, e, transposed).t()
            if lx is None:
                torch.mm(dye, w_out_in, out=dx[lo:hi])
            else:
                dx[lo:hi].copy_(lx).addmm_(dye, w_out_in)
    return dx, dA, (peft_B(dBt.t(), E) if dBt is not None else None)


def _base_grads(dy, x, plan, E, transposed, needs_dW, needs_dbias, weight):
    """dW (E, out, in) / (E, in, out) and dbias (E, out) of trainable expert weights (not what LoRA is for,
    but answered correctly): per expert segment (a host read of the bounds) and an index_add (device)."""
    dW = dbias = None
    if needs_dW:
        dW = torch.zeros_like(weight)
        for e, lo, hi in host_segments(plan):
            g = dy[lo:hi].t() @ x[lo:hi].to(dy.dtype)                          # (out, in)
            dW[e] = (g.t() if transposed else g).to(weight.dtype)
    if needs_dbias:
        dbias = torch.zeros((E, dy.shape[1]), dtype=torch.float32, device=dy.device)
        dbias.index_add_(0, plan.ids.long(), dy.float())
    return dW, dbias


# ---------------------------------------------------------------------------
# dispatch: "torch" = the maths above; "triton" = grouped base GEMM + the multi-adapter gather kernels
# ---------------------------------------------------------------------------

def _grouped(a: Tensor, w3: Tensor, plan: BatchPlan) -> Tensor:
    """a (S, k) · w3[e] (k, n) for each expert segment -> (S, n): torch's grouped GEMM (cuBLAS-backed on CUDA,
    bf16 there; fp32 / fp16 / bf16 on CPU; strides of 16 bytes, as every real model's widths give); otherwise
    (other dtypes on CUDA, float64, odd widths) per expert segment, reading the bounds (on CUDA one host sync per
    call: grouped_mm's CUDA kernels take bf16 only)."""
    if a.shape[0] == 0:
        return a.new_empty((0, w3.shape[2]))
    align = 16 // a.element_size()
    aligned = all(st % align == 0 for t in (a, w3) for st in t.stride() if st != 1) and \
        a.data_ptr() % 16 == 0 and w3.data_ptr() % 16 == 0
    if not aligned or (a.dtype != torch.bfloat16 and (a.device.type == "cuda" or a.dtype == torch.float64)):
        y = a.new_empty((a.shape[0], w3.shape[2]))
        for e, lo, hi in host_segments(plan):
            torch.mm(a[lo:hi], w3[e], out=y[lo:hi])
        return y
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return mm(a, w3, offs=plan.bounds[1:])


def _tables(E: int, r: int, scaling: float, p: float, device):
    """Cached (off (E+1,) int32 = e·r, scales (E,) float32 = s, pk (E, 2) float32 = (p, 1/(1−p))) for the kernels."""
    dev = torch.device(device)
    off = cached_tensor(("moe_off", E, r, dev), lambda: torch.arange(E + 1, dtype=torch.int32, device=dev) * r)
    scales = cached_tensor(("moe_scale", float(scaling), E, dev),
                           lambda: torch.full((E,), float(scaling), dtype=torch.float32, device=dev))
    pk = cached_tensor(("moe_pk", float(p), E, dev), lambda: torch.tensor(
        [[p, 1.0 / (1.0 - p)]] * E, dtype=torch.float32, device=dev))
    return off, scales, pk


def triton_forward(x, weight, bias, lora_A, lora_B, scaling, plan, transposed, p, seed, save_s):
    """torch_forward's contract: y = grouped base GEMM, then (bias) and y += s·S·B_eᵀ by the expand kernel in
    place (ACCUMULATE), S = drop(x)·A_eᵀ by the gather shrink kernel."""
    E, n_slots = weight.shape[0], x.shape[0]
    r = 0 if lora_A is None else lora_A.shape[0] // E
    y = _grouped(x, weight if transposed else weight.transpose(1, 2), plan)
    if bias is not None:
        y.add_(bias.index_select(0, plan.ids.long()))
    if not (r and n_slots):
        return y, x.new_empty((n_slots if save_s and r else 0, r), dtype=torch.float32)
    ml = _kernels()
    off, scales, pk = _tables(E, r, scaling, p, x.device)
    Sv = ml._scratch((n_slots, r), x.device)
    Bb = bank_B(lora_B, E)
    ml.shrink(x, lora_A, (lora_A.stride(0), lora_A.stride(1)), Sv, plan, off, scales, seed, pk, r,
              scaled=False, dropout=p > 0)
    ml.expand(Sv, Bb, (Bb.stride(1), Bb.stride(0)), y, None, plan, off, scales, seed, pk, scaled=True,
              dropout=False, accumulate=True)
    return y, (Sv if save_s else Sv[:0])


def triton_backward(dy, x, weight, lora_A, lora_B, S, scaling, plan, transposed, p, seed,
                    needs_dx, needs_dA, needs_dB):
    """torch_backward's contract: dx = grouped dY·W_e, += (dS·A_e)⊙keep by the expand kernel in place; dS by the
    shrink kernel; dA, dB by the per-expert gradient kernel (every row written: zeros for experts without slots)."""
    E, n_slots = weight.shape[0], x.shape[0]
    r = 0 if lora_A is None else lora_A.shape[0] // E
    dx = _grouped(dy, weight.transpose(1, 2) if transposed else weight, plan) if needs_dx else None
    if not r:
        return dx, None, None
    if not n_slots:
        return dx, (torch.zeros_like(lora_A) if needs_dA else None), (torch.zeros_like(lora_B) if needs_dB else None)
    ml = _kernels()
    off, scales, pk = _tables(E, r, scaling, p, x.device)
    Bb = bank_B(lora_B, E)
    dA = dB = None
    if needs_dx or needs_dA:
        dS = ml._scratch((n_slots, r), x.device)
        ml.shrink(dy, Bb, (Bb.stride(1), Bb.stride(0)), dS, plan, off, scales, seed, pk, r, scaled=True, dropout=False)
        if needs_dx:
            ml.expand(dS, lora_A, (lora_A.stride(0), lora_A.stride(1)), dx, None, plan, off, scales, seed, pk,
                      scaled=False, dropout=p > 0, accumulate=True)
        if needs_dA:
            dA = ml._scratch(lora_A.shape, x.device, lora_A.dtype, like=lora_A)
            ml.segment_grad(dS, x, dA, (dA.stride(0), dA.stride(1)), plan, off, scales, seed, pk, r, scaled=False,
                            dropout=p > 0, base_dtype=x.dtype)
    if needs_dB:
        dBb = ml._scratch(Bb.shape, x.device, Bb.dtype, like=Bb)
        ml.segment_grad(S, dy, dBb, (dBb.stride(1), dBb.stride(0)), plan, off, scales, seed, pk, r, scaled=True,
                        dropout=False, base_dtype=x.dtype)
        dB = peft_B(dBb, E)
    return dx, dA, dB


def _forward(x, weight, bias, lora_A, lora_B, scaling, plan, transposed, p, seed, save_s, backend):
    fn = triton_forward if select_backend(x.device, backend) == "triton" else torch_forward
    return fn(x, weight, bias, lora_A, lora_B, scaling, plan, transposed, p, seed, save_s)


def _backward(dy, x, weight, lora_A, lora_B, S, scaling, plan, transposed, p, seed, needs, backend):
    needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW = needs
    fn = triton_backward if select_backend(x.device, backend) == "triton" else torch_backward
    dx, dA, dB = fn(dy, x, weight, lora_A, lora_B, S, scaling, plan, transposed, p, seed, needs_dx, needs_dA,
                    needs_dB)
    dW, dbias = _base_grads(dy, x, plan, weight.shape[0], transposed, needs_dW, needs_dbias, weight)
    return dx, dA, dB, dbias, dW


# ---------------------------------------------------------------------------
# registration: custom ops (eager and torch.compile); the plan travels as its int32 tensor
# ---------------------------------------------------------------------------

def _plan_view(plan: Tensor, x: Tensor, weight: Tensor, regime: str) -> BatchPlan:
    return BatchPlan(plan, (x.shape[0],), weight.shape[0], regime)


def _op_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                scaling: float, plan: Tensor, regime: str, transposed: bool, dropout_p: float, seed: Tensor,
                save_s: bool, backend: str) -> tuple[Tensor, Tensor]:
    y, S = _forward(x, weight, bias, lora_A, lora_B, scaling, _plan_view(plan, x, weight, regime), transposed,
                    dropout_p, seed, save_s, backend)
    return y, S.contiguous()


def _op_forward_fake(x, weight, bias, lora_A, lora_B, scaling, plan, regime, transposed, dropout_p, seed, save_s,
                     backend):
    out_f = weight.shape[2] if transposed else weight.shape[1]
    r = 0 if lora_A is None else lora_A.shape[0] // weight.shape[0]
    return x.new_empty((x.shape[0], out_f)), x.new_empty((x.shape[0] if save_s and r else 0, r),
                                                         dtype=torch.float32)


def _op_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Optional[Tensor], lora_B: Optional[Tensor], S: Tensor,
                 scaling: float, plan: Tensor, regime: str, transposed: bool, dropout_p: float, seed: Tensor,
                 needs_dx: bool, needs_dA: bool, needs_dB: bool, needs_dbias: bool, needs_dW: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, lora_A, lora_B, S, scaling, _plan_view(plan, x, weight, regime), transposed,
                     dropout_p, seed, (needs_dx, needs_dA, needs_dB, needs_dbias, needs_dW), backend)


def _op_backward_fake(dy, x, weight, lora_A, lora_B, S, scaling, plan, regime, transposed, dropout_p, seed, needs_dx,
                      needs_dA, needs_dB, needs_dbias, needs_dW, backend):
    def like(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else None
    return (like(x, needs_dx), like(lora_A, needs_dA), like(lora_B, needs_dB),
            x.new_empty((weight.shape[0], dy.shape[1]), dtype=torch.float32) if needs_dbias else None,
            like(weight, needs_dW))


def _save(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, plan, regime, transposed, dropout_p, seed, save_s, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, plan, output[1], seed)
    ctx.meta = (scaling, regime, transposed, dropout_p, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx, bwd, dy, _dS):
    x, weight, lora_A, lora_B, plan, S, seed = ctx.saved_tensors
    scaling, regime, transposed, p, backend = ctx.meta
    nx, nw, nb, na, nbb = ctx.needs_input_grad[:5]
    dx, dA, dB, dbias, dW = bwd(dy.contiguous(), x, weight, lora_A, lora_B, S, scaling, plan, regime, transposed, p,
                                seed, nx, na, nbb, nb, nw, backend)
    return (dx if nx else None, dW if nw else None, dbias.to(ctx.bias_dtype) if nb else None,
            dA if na else None, dB if nbb else None) + (None,) * 8


moe_linear_fwd, moe_linear_bwd = register_op("moe_linear", _op_forward, _op_forward_fake, _op_backward,
                                             _op_backward_fake, save=_save, grads=_grads)


# ---------------------------------------------------------------------------
# functional
# ---------------------------------------------------------------------------

class ExpertLora(NamedTuple):
    """One projection's LoRA, PEFT's layout: lora_A (E·r, in), lora_B (out, E·r) (expert e = columns j·E + e),
    scaling s, dropout_p on the projection's input (training only)."""
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float = 0.0


def _check_weight(name: str, w, E, x_dtype, device):
    if not isinstance(w, Tensor) or w.dim() != 3 or (E is not None and w.shape[0] != E):
        want = "(E, out, in) (or (E, in, out) with transposed=True)" if E is None else f"({E}, ., .)"
        raise ValueError(f"{name} must be a 3-D expert stack {want}, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if w.dtype != x_dtype or w.device != device:
        raise TypeError(f"{name} must have x's dtype {x_dtype} and device {device}, got {w.dtype} on {w.device}")


def _check_lora(name: str, lora, E: int, in_f: int, out_f: int, x_dtype, device) -> None:
    if not isinstance(lora, ExpertLora):
        raise TypeError(f"{name} must be a fastlora.ops.moe.ExpertLora(lora_A, lora_B, scaling, dropout_p) or None, "
                        f"got {type(lora).__name__}")
    A, B = lora.lora_A, lora.lora_B
    if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.dim() != 2 or B.dim() != 2 \
            or A.shape[0] % E or A.shape[0] == 0 or tuple(A.shape) != (A.shape[0], in_f) \
            or tuple(B.shape) != (out_f, A.shape[0]):
        raise ValueError(f"{name}: lora_A must be (E·r, {in_f}) and lora_B ({out_f}, E·r) with E = {E}, r ≥ 1 "
                         f"(PEFT's ParamWrapper layout); got {tuple(getattr(A, 'shape', ()))}, "
                         f"{tuple(getattr(B, 'shape', ()))}")
    ok = (x_dtype,) + ((torch.float32,) if x_dtype in (torch.float16, torch.bfloat16) else ())
    if A.dtype != B.dtype or A.dtype not in ok or A.device != device or B.device != device:
        raise TypeError(f"{name}: lora_A and lora_B must share one dtype in {[str(d) for d in ok]} and x's device "
                        f"{device}; got {A.dtype}, {B.dtype} on {A.device}, {B.device}")
    if not isinstance(lora.scaling, numbers.Real) or isinstance(lora.scaling, bool):
        raise TypeError(f"{name}: scaling must be a float, got {type(lora.scaling).__name__}")
    if not isinstance(lora.dropout_p, numbers.Real) or not 0.0 <= float(lora.dropout_p) < 1.0:
        raise ValueError(f"{name}: dropout_p must be a float in [0, 1), got {lora.dropout_p!r}")


def _project(z, weight, bias, lora, plan, transposed, training, seed, backend):
    """One projection of the expert-sorted slot inputs z through the custom op."""
    A = B = None
    s = p = 0.0
    if lora is not None:
        A, B, s, p = lora.lora_A, lora.lora_B, float(lora.scaling), float(lora.dropout_p)
    p = p if training else 0.0
    if p > 0:
        seed_t = new_seed(z.device) if seed is None else torch.as_tensor(seed, dtype=torch.int64, device=z.device)
    else:
        seed_t = _constant(0, torch.int64, z.device)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, weight, bias, A, B))
    y, _ = moe_linear_fwd(z, weight, bias, A, B, s, plan.slots.data, plan.slots.regime, transposed, p, seed_t,
                          grad, backend)
    return y


def lora_experts(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                 gate: Callable[[Tensor], Tensor], *, gate_up_lora: ExpertLora | None = None,
                 down_lora: ExpertLora | None = None, gate_up_bias: Tensor | None = None,
                 down_bias: Tensor | None = None, transposed: bool = False,
                 post: Callable[[Tensor], Tensor] | None = None, training: bool = True,
                 seed: int | None = None, backend: str | None = None) -> Tensor:
    """out[t] = Σ_k w[t,k]·down_e(gate(gate_up_e(x[t]))), each projection with its experts' LoRA; differentiable in x,
    top_k_weights, every LoRA factor (and the expert weights / biases if they require grad).

    x (T, H) · top_k_index (T, K) int in [0, E) · top_k_weights (T, K) float (any float dtype; the sum over k runs
    in the promoted dtype, then is cast to x's, as transformers' grouped_mm experts) · gate_up_proj (E, 2I, H) and
    down_proj (E, H, I), or (E, H, 2I) / (E, I, H) with ``transposed`` (gpt-oss), x's dtype · gate: the activation
    between the projections, on (S, 2I) (e.g. the experts module's ``_apply_gate``, or ``act_fn`` for ungated
    experts) · *_lora: ExpertLora or None (no LoRA on that projection) · *_bias (E, out) or None · post: applied to
    each slot's output before the routing weight (``post_expert_norm``). seed: the dropout seed of gate_up's input
    (down's: seed + 1); default drawn from torch's generator. Returns (T, H) in x's dtype.
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be a 2-D float tensor (tokens, hidden), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(top_k_index, Tensor) or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0] \
            or top_k_index.dtype not in (torch.int32, torch.int64) or top_k_index.device != x.device:
        raise ValueError(f"top_k_index must be an int tensor ({x.shape[0]}, K) on x's device, got "
                         f"{getattr(top_k_index, 'dtype', type(top_k_index).__name__)} "
                         f"{tuple(getattr(top_k_index, 'shape', ()))}")
    if not isinstance(top_k_weights, Tensor) or tuple(top_k_weights.shape) != tuple(top_k_index.shape) \
            or not top_k_weights.is_floating_point() or top_k_weights.device != x.device:
        raise ValueError(f"top_k_weights must be a float tensor of top_k_index's shape {tuple(top_k_index.shape)} "
                         f"on x's device, got {tuple(getattr(top_k_weights, 'shape', ()))}")
    _check_weight("gate_up_proj", gate_up_proj, None, x.dtype, x.device)
    E = gate_up_proj.shape[0]
    _check_weight("down_proj", down_proj, E, x.dtype, x.device)
    gu_in, gu_out = (gate_up_proj.shape[1], gate_up_proj.shape[2])[::1 if transposed else -1]
    d_in, d_out = (down_proj.shape[1], down_proj.shape[2])[::1 if transposed else -1]
    if gu_in != x.shape[1] or d_out != x.shape[1]:
        raise ValueError(f"gate_up_proj must take and down_proj return x's {x.shape[1]} features "
                         f"(transposed={transposed}), got {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    for name, lora, i, o in (("gate_up_lora", gate_up_lora, gu_in, gu_out), ("down_lora", down_lora, d_in, d_out)):
        if lora is not None:
            _check_lora(name, lora, E, i, o, x.dtype, x.device)
    for name, b, o in (("gate_up_bias", gate_up_bias, gu_out), ("down_bias", down_bias, d_out)):
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (E, o) or b.dtype != x.dtype):
            raise ValueError(f"{name} must be ({E}, {o}) in x's dtype {x.dtype} or None")
    be = resolve_backend_choice(backend)
    plan = plan_routing(top_k_index, E)
    xs = x.index_select(0, plan.tok)                                              # (S, H), expert order
    h = _project(xs, gate_up_proj, gate_up_bias, gate_up_lora, plan, transposed, training, seed, be)
    a = gate(h)
    if a.shape[1] != d_in:
        raise ValueError(f"gate must map gate_up's {h.shape[1]} features to down_proj's {d_in}, gave {a.shape[1]}")
    y = _project(a.to(x.dtype), down_proj, down_bias, down_lora, plan, transposed, training,
                 None if seed is None else int(seed) + 1, be)
    if post is not None:
        y = post(y)
    w = top_k_weights.reshape(-1).index_select(0, plan.perm)
    weighted = y * w[:, None]                                                    # base and LoRA terms alike
    out = weighted.index_select(0, plan.inv).view(plan.T, plan.K, weighted.shape[1]).sum(dim=1)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------
# transformers experts modules
# ---------------------------------------------------------------------------

def experts_layout(experts: nn.Module) -> str | None:
    """Why ``experts`` is not a transformers experts module of a layout this op serves (None if it is): a class
    decorated with @use_experts_implementation (it sets is_transposed / has_gate / has_bias), 3-D
    gate_up_proj (or up_proj when ungated) and down_proj stacks of num_experts."""
    missing = [a for a in ("is_transposed", "has_gate", "has_bias", "num_experts") if not hasattr(experts, a)]
    if missing:
        return (f"{type(experts).__name__} is not a transformers @use_experts_implementation experts class "
                f"(no {', '.join(missing)}): layout unknown")
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    for name in (first, "down_proj"):
        w = getattr(experts, name, None)
        if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[0] != experts.num_experts:
            return f"{type(experts).__name__}.{name} is not a 3-D stack of {experts.num_experts} experts"
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{type(experts).__name__}.{name} is {w.dtype} (fastlora serves float32 / float16 / bfloat16)"
        if experts.has_bias and not isinstance(getattr(experts, name + "_bias", None), Tensor):
            return f"{type(experts).__name__} has has_bias=True but no {name}_bias"
    if experts.has_gate and not callable(getattr(experts, "_apply_gate", None)):
        return f"{type(experts).__name__} has has_gate=True but no _apply_gate"
    if not experts.has_gate and not callable(getattr(experts, "act_fn", None)):
        return f"{type(experts).__name__} has no act_fn"
    if getattr(experts, "has_post_expert_norm", False) and not callable(getattr(experts, "post_expert_norm", None)):
        return f"{type(experts).__name__} has has_post_expert_norm=True but no post_expert_norm"
    return None


def experts_forward(experts: nn.Module, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    loras: dict[str, ExpertLora], *, training: bool = True, seed: int | None = None,
                    backend: str | None = None) -> Tensor:
    """lora_experts on a transformers experts module (experts_layout(experts) is None): its weights, biases,
    orientation, its own ``_apply_gate`` (or ``act_fn``) and ``post_expert_norm``; ``loras`` maps
    "gate_up_proj" / "up_proj" / "down_proj" to that projection's LoRA. x is cast to the experts' dtype first
    (as transformers' grouped_mm experts do)."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    w1, w2 = getattr(experts, first), experts.down_proj
    b1 = getattr(experts, first + "_bias") if experts.has_bias else None
    b2 = experts.down_proj_bias if experts.has_bias else None
    gate = experts._apply_gate if experts.has_gate else experts.act_fn
    post = experts.post_expert_norm if getattr(experts, "has_post_expert_norm", False) else None
    out = lora_experts(x.to(w1.dtype), top_k_index, top_k_weights, w1, w2, gate, gate_up_lora=loras.get(first),
                       down_lora=loras.get("down_proj"), gate_up_bias=b1, down_bias=b2,
                       transposed=bool(experts.is_transposed), post=post, training=training, seed=seed,
                       backend=backend)
    return out.to(x.dtype)


__all__ = ["lora_experts", "experts_forward", "ExpertLora", "plan_routing", "RoutingPlan", "experts_layout",
           "bank_B", "peft_B"]
