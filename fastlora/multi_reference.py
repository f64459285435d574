"""The multi-adapter op's maths in plain torch: the CPU backend of fastlora::multi_lora_fwd / _bwd (same
contract as fastlora.kernels.multi_lora.multi_lora_fwd / _bwd), as fastlora.reference is the single-adapter
op's.

Dense and masked: S_all = drop(x)·A_packedᵀ (M, R_tot), columns of other adapters zeroed, times s_k, then
·B_packedᵀ. Exact, no Python loop over adapters, no host sync; it spends M·R_tot·(K+N) FLOPs instead of
Σ_m r_{ids[m]}·(K+N), which is what the kernels spend, but reads every adapter once with two GEMMs. A tiled
variant (the kernels' token plan, A_k / B_k gathered per tile, one bmm per tile) was measured slower on this
CPU for the benchmark shapes (the gathers copy M·r_max·(K+N) elements; bmm with r ≤ 128 columns runs far
below GEMM speed), so it is not shipped.

S (M, r_max) float32 is what forward saves for backward: S[m, :r_k] = drop(x)[m]·A_kᵀ (the kernels' layout).
"""
from __future__ import annotations

import torch

from .dropout import keep_mask


def _column_masks(offsets, scalings, ids, R_tot):
    """((M, R_tot) float32: s_k where packed column j belongs to token m's adapter k, else 0; column -> adapter)."""
    ranks = offsets[1:] - offsets[:-1]
    col = torch.repeat_interleave(torch.arange(ranks.numel(), device=ids.device), ranks, output_size=R_tot)
    return (ids.long()[:, None] == col[None, :]) * scalings[col][None, :], col


def _keep_scale(seed, M, K, p, device):
    return keep_mask(seed, M, K, p, device).to(torch.float32) / (1.0 - p) if p > 0 else None


def multi_torch_forward(x, weight, bias, lora_A, lora_B, offsets, scalings, ids, r_max, dropout_p, seed,
                  fan_in_fan_out, save_s):
    K, R_tot = x.shape[-1], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    w = weight.t() if fan_in_fan_out else weight
    y = torch.addmm(bias.to(x.dtype), x2, w.t()) if bias is not None else x2 @ w.t()
    ks = _keep_scale(seed, M, K, dropout_p, x.device)
    d = x2.to(lora_A.dtype) if ks is None else x2.to(lora_A.dtype) * ks.to(lora_A.dtype)
    S_all = d @ lora_A.t()                                         # (M, R_tot): every adapter, every token
    colscale, _ = _column_masks(offsets, scalings, ids, R_tot)
    Sm = S_all * colscale.to(S_all.dtype)                          # other adapters' columns -> 0, times s_k
    if lora_B.dtype == y.dtype:
        y.addmm_(Sm, lora_B.t())
    else:
        y.add_((Sm @ lora_B.t()).to(y.dtype))
    S = _pack_S(S_all, offsets, ids, r_max) if save_s else x.new_zeros((0, r_max), dtype=torch.float32)
    return y.reshape(*x.shape[:-1], w.shape[0]), S


def _gather_index(offsets, ids, r_max, R_tot):
    """(M, r_max) packed column of S[m, j] and whether it exists (j < r_k, k ≥ 0)."""
    k = ids.long().clamp(min=0)
    j = torch.arange(r_max, device=ids.device)
    valid = (ids[:, None] >= 0) & (j[None, :] < (offsets[k + 1] - offsets[k])[:, None])
    idx = (offsets[k].long()[:, None] + j[None, :]).clamp(max=max(R_tot - 1, 0))
    return idx, valid


def _pack_S(S_all, offsets, ids, r_max):
    idx, valid = _gather_index(offsets, ids, r_max, S_all.shape[1])
    return torch.where(valid, S_all.float().gather(1, idx), 0.0)


def _unpack_S(S, offsets, ids, R_tot):
    idx, valid = _gather_index(offsets, ids, S.shape[1], R_tot)
    dump = torch.full_like(idx, R_tot)                             # invalid entries go to a dropped column
    out = S.new_zeros((S.shape[0], R_tot + 1)).scatter_(1, torch.where(valid, idx, dump), S)
    return out[:, :R_tot]


def multi_torch_backward(dy, x, weight, lora_A, lora_B, offsets, scalings, ids, S, dropout_p, seed, fan_in_fan_out,
                   needs_dx, needs_dA, needs_dB):
    """(dx, dA (R_tot, K), dB (N, R_tot)); None where not needed. Dense-masked like multi_torch_forward."""
    K, N, R_tot, ad = x.shape[-1], dy.shape[-1], lora_A.shape[0], lora_A.dtype
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    w = weight.t() if fan_in_fan_out else weight
    colscale, _ = _column_masks(offsets, scalings, ids, R_tot)
    colscale = colscale.to(ad)
    ks = _keep_scale(seed, x2.shape[0], K, dropout_p, x.device)
    dyl = dy2.to(ad)
    dS = (dyl @ lora_B) * colscale                                 # (M, R_tot) = s_k·dY·B_k on token m's columns
    dx = dA = dB = None
    if needs_dB:
        dB = dyl.t() @ (_unpack_S(S, offsets, ids, R_tot).to(ad) * colscale)
    if needs_dA:
        d = x2.to(ad) if ks is None else x2.to(ad) * ks.to(ad)
        dA = dS.t() @ d
    if needs_dx:
        lx = dS @ lora_A
        if ks is not None:
            lx = lx * ks.to(ad)
        dx = torch.addmm(lx.to(dy2.dtype), dy2, w.to(dy2.dtype)).reshape(x.shape)
    return dx, dA, dB


__all__ = ["multi_torch_forward", "multi_torch_backward"]
