"""The project's one tolerance idiom, and worst-mismatch reporting.

    error(op, float64 oracle)  <=  FACTOR * error(plain torch in the same dtype, float64 oracle)  +  atol

(flash-attention's idiom). ``error`` is the max absolute difference over the tensor. The
baseline is what a user runs today in the same dtype (PEFT's lora.Linear, or plain torch), so
"2x the baseline" says: the fused op may round differently, but not worse than twice as badly
as the code it replaces. Both sides are compared with the same float64 oracle, built from the
same inputs (same dropout mask), so the bound is tight and cannot be met by a wrong answer.

atol covers the case where the baseline is (nearly) exact by luck, e.g. all-fp32 runs where
both errors are ~1e-7, or tiny shapes where torch's single rounding is exact. It is counted in
units of the *result dtype's* epsilon times the largest |oracle| value (the output's scale):

    fp16 / bf16: 2 ulps   the op rounds once from fp32 (<= 0.5 ulp); 2 ulps of slack is one
                          rounding of the baseline plus an fp32-accumulation-order difference.
    fp32:       64 ulps   accumulation order (blocked tl.dot vs MKL) differs by ~sqrt(K) ulps,
                          still ~8e-6 relative: any real bug is orders of magnitude larger.

Use:
    assert_close(name, got, oracle64, baseline)          # the idiom
    assert_baseline_sane(name, baseline, oracle64)       # the baseline itself agrees with the oracle
"""
from __future__ import annotations

import torch

FACTOR = 2.0
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
       torch.float64: 2.0 ** -52}
ATOL_ULPS = {torch.float32: 64.0, torch.float16: 2.0, torch.bfloat16: 2.0, torch.float64: 64.0}
# How far a *baseline* (PEFT, plain torch) may be from the oracle, in ulps of the output scale.
# Used only to prove that baseline and oracle compute the same maths (same mask, same scaling,
# same layout): a semantic mismatch is an O(1) relative error, >> 8 ulps (fp16: 0.8%, bf16: 6%;
# PEFT measures <= 4 ulps here; the factor-2 idiom against the oracle is the sharp check).
BASELINE_ULPS = 8.0


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| in float64 (0 for empty tensors; inf when got has a nan where ref has none)."""
    if got.numel() == 0:
        return 0.0
    d = (got.detach().double() - ref.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return d.max().item()


def scale_of(ref: torch.Tensor) -> float:
    """The output's scale: max |ref| (0 for empty tensors)."""
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


def atol_for(dtype: torch.dtype, ref: torch.Tensor) -> float:
    return ATOL_ULPS[dtype] * EPS[dtype] * scale_of(ref)


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
                 *, factor: float = FACTOR, atol: float | None = None) -> None:
    """The idiom: max|got - ref| <= factor * max|baseline - ref| + atol.

    got: the op's result; ref: the float64 oracle; baseline: plain torch / PEFT in the same dtype
    as got. Shapes must match; got must have baseline's dtype (the op must not change dtypes).
    atol defaults to ATOL_ULPS[got.dtype] ulps of the output scale (see module docstring).
    """
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert got.dtype == baseline.dtype, f"{name}: dtype {got.dtype}, expected {baseline.dtype} (as the baseline)"
    err, base_err = max_err(got, ref), max_err(baseline, ref)
    if atol is None:
        atol = atol_for(got.dtype, ref)
    bound = factor * base_err + atol
    assert err <= bound, (
        f"{name}: max error vs float64 {err:.3g} > {factor} x baseline error {base_err:.3g} + atol "
        f"{atol:.3g} (dtype {got.dtype}, scale {scale_of(ref):.3g}); worst "
        f"{worst_mismatch(got, ref, baseline)}")


def assert_baseline_sane(name: str, baseline: torch.Tensor, ref: torch.Tensor,
                         *, ulps: float = BASELINE_ULPS) -> None:
    """The baseline (e.g. PEFT) computes the oracle's maths: max|baseline - ref| <= ulps·eps·scale.

    Without this, a wrong oracle (or a wrongly configured baseline) could make the idiom
    meaningless; with it, op ≈ oracle ≈ baseline.
    """
    assert baseline.shape == ref.shape, f"{name}: baseline shape {tuple(baseline.shape)} != {tuple(ref.shape)}"
    err = max_err(baseline, ref)
    bound = ulps * EPS[baseline.dtype] * scale_of(ref) + 1e-30
    assert err <= bound, (f"{name}: baseline disagrees with the float64 oracle: {err:.3g} > {bound:.3g}; "
                          f"worst {worst_mismatch(baseline, ref)}")
