"""The project's one tolerance idiom, and worst-mismatch reporting.

    error(op, float64 oracle)  <=  FACTOR * error(plain torch in the same dtype, float64 oracle)  +  atol

(flash-attention's idiom). ``error`` is the max absolute difference over the tensor. The
baseline is what a user runs today in the same dtype (PEFT's lora.Linear, or plain torch), so
"2x the baseline" says: the fused op may round differently, but not worse than twice as badly
as the code it replaces. Both sides are compared with the same float64 oracle, built from the
same inputs (same dropout mask), so the bound is tight and cannot be met by a wrong answer.

atol covers the case where the baseline is (nearly) exact by luck, e.g. all-fp32 runs where
both errors are ~1e-7, or tiny shapes where torch's single rounding is exact. It is counted in
units of the *result dtype's* epsilon times a *scale*:

    scale = max |oracle| by default; better, pass ``scale=`` the oracle evaluated on |inputs|
    (Σ|terms| of every sum, the classic bound of rounding error in a dot product). With
    cancellation (terms of size 1 summing to 1e-3) rounding errors are relative to the terms,
    not to the result; scaling by |result| would then fail correct code whose baseline happened
    to round luckily (hypothesis finds such cases with K = N = 1).

    fp16 / bf16: 1 ulp    the op rounds once from fp32 (<= 0.5 ulp of the result);
    fp32:        4 ulps   accumulation order (blocked tl.dot vs MKL) differs by a few ulps.
    Measured on the parity grid (tests/ops/test_linear_parity.py), in ulps of the Σ|terms| scale:
    fastlora <= 0.6 (fp32) / 0.35 (halves), PEFT <= 0.65 / 0.4; a real bug is orders larger
    (a 0.1% error in one gradient's scale fails every fp32 case).

Use:
    assert_close(name, got, oracle64, baseline[, scale=abs_oracle64])     # the idiom
    assert_baseline_sane(name, baseline, oracle64[, scale=abs_oracle64])  # the baseline agrees with the oracle
"""
from __future__ import annotations

import torch

FACTOR = 2.0
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
       torch.float64: 2.0 ** -52}
ATOL_ULPS = {torch.float32: 4.0, torch.float16: 1.0, torch.bfloat16: 1.0, torch.float64: 4.0}
# How far a *baseline* (PEFT, plain torch) may be from the oracle, in ulps of the output scale.
# Used only to prove that baseline and oracle compute the same maths (same mask, same scaling,
# same layout): a semantic mismatch is an O(1) relative error, >> 4 ulps (fp16: 0.4%, bf16: 3%;
# PEFT measures <= 0.65 ulp of the Σ|terms| scale; the factor-2 idiom is the sharp check).
BASELINE_ULPS = 4.0


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| in float64 (0 for empty tensors; inf when got has a nan where ref has none)."""
    if got.numel() == 0:
        return 0.0
    d = (got.detach().double() - ref.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return d.max().item()


def scale_of(ref: torch.Tensor | float) -> float:
    """The output's scale: max |ref| (0 for empty tensors); a float is taken as it is."""
    if not isinstance(ref, torch.Tensor):
        return float(ref)
    return ref.detach().abs().max().item() if ref.numel() else 0.0


def worst_mismatch(got: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None = None) -> str:
    """'index (i, j, ...): got G, expected E[, baseline B]' for the largest |got - ref|."""
    if got.numel() == 0:
        return "empty tensors"
    d = (got.detach().double() - ref.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    flat = int(d.reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
    msg = f"index {idx}: got {got.detach()[idx].item():.8g}, expected {ref.detach()[idx].item():.8g}"
    if baseline is not None:
        msg += f", baseline {baseline.detach()[idx].item():.8g}"
    return msg


def atol_for(dtype: torch.dtype, scale: torch.Tensor | float) -> float:
    return ATOL_ULPS[dtype] * EPS[dtype] * scale_of(scale)


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
                 *, factor: float = FACTOR, atol: float | None = None,
                 scale: torch.Tensor | float | None = None) -> None:
    """The idiom: max|got - ref| <= factor * max|baseline - ref| + atol.

    got: the op's result; ref: the float64 oracle; baseline: plain torch / PEFT in the same dtype
    as got. Shapes must match; got must have baseline's dtype (the op must not change dtypes).
    atol defaults to ATOL_ULPS[got.dtype] ulps of ``scale`` (default: ref; see module docstring).
    """
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert got.dtype == baseline.dtype, f"{name}: dtype {got.dtype}, expected {baseline.dtype} (as the baseline)"
    err, base_err = max_err(got, ref), max_err(baseline, ref)
    scale = ref if scale is None else scale
    if atol is None:
        atol = atol_for(got.dtype, scale)
    bound = factor * base_err + atol
    assert err <= bound, (
        f"{name}: max error vs float64 {err:.3g} > {factor} x baseline error {base_err:.3g} + atol "
        f"{atol:.3g} (dtype {got.dtype}, scale {scale_of(scale):.3g}); worst "
        f"{worst_mismatch(got, ref, baseline)}")


def assert_baseline_sane(name: str, baseline: torch.Tensor, ref: torch.Tensor,
                         *, ulps: float = BASELINE_ULPS, scale: torch.Tensor | float | None = None) -> None:
    """The baseline (e.g. PEFT) computes the oracle's maths: max|baseline - ref| <= ulps·eps·scale.

    Without this, a wrong oracle (or a wrongly configured baseline) could make the idiom
    meaningless; with it, op ≈ oracle ≈ baseline.
    """
    assert baseline.shape == ref.shape, f"{name}: baseline shape {tuple(baseline.shape)} != {tuple(ref.shape)}"
    err = max_err(baseline, ref)
    bound = ulps * EPS[baseline.dtype] * scale_of(ref if scale is None else scale) + 1e-30
    assert err <= bound, (f"{name}: baseline disagrees with the float64 oracle: {err:.3g} > {bound:.3g}; "
                          f"worst {worst_mismatch(baseline, ref)}")
