"""The multi-adapter op's maths in plain torch: the CPU backend of fastlora::multi_lora_fwd / _bwd (same
contract as fastlora.kernels.multi_lora.multi_lora_fwd / _bwd), as fastlora.ops.lora is the single-adapter
op's.

Dense and masked: S_all = drop(x)·A_packedᵀ (M, R_tot), columns of other adapters zeroed, times s_k, then
·B_packedᵀ. Exact, no Python loop over adapters, no host sync; it spends M·R_tot·(K+N) FLOPs instead of
Σ_m r_{ids[m]}·(K+N), which is what the kernels spend, but reads every adapter once with two GEMMs. A tiled
variant (the kernels' token plan, A_k / B_k gathered per tile, one bmm per tile) was measured slower on this
CPU for the benchmark shapes (the gathers copy M·r_max·(K+N) elements; bmm with r ≤ 128 columns runs far
below GEMM speed), so it is not shipped.

On CPU, where reading the ids on the host costs nothing, the same maths also runs per adapter segment: runs of
tokens sharing an adapter, in token order or gathered by adapter when the order is fragmented, two small GEMMs
per run, Σ_m r_{ids[m]}·(K+N) FLOPs. A cost model (``segment_plan``) picks dense or segments; shapes alone
keep tiny problems dense without any host read.

S (M, r_max) float32 is what forward saves for backward: S[m, :r_k] = drop(x)[m]·A_kᵀ (the kernels' layout).
"""
from __future__ import annotations

import weakref

import torch

from ..core.checks import weight_nk
from ..core.dropout import draw_keep


def _column_masks(offsets, scalings, ids, R_tot):
    """(M, R_tot) float32: s_k where packed column j belongs to token m's adapter k, else 0."""
    ranks = offsets[1:] - offsets[:-1]
    col = torch.repeat_interleave(torch.arange(ranks.numel(), device=ids.device), ranks, output_size=R_tot)
    return (ids.long()[:, None] == col[None, :]) * scalings[col][None, :]


segments_enabled = True   # False: always dense (benchmarks, tests of the dense path)


def _segments(plan, x, M, K, N, R_tot, offsets):
    """The per-adapter segment plan on CPU: (order, runs) or None for dense masking (always None on other
    devices). Shapes alone decide when it is surely dense (one adapter, or a problem of a couple of GEMM calls);
    otherwise the plan's host reads (``BatchPlan.host_runs``, once per plan, shared by every layer) and this
    layer's ranks go through the cost model below."""
    if (x.device.type != "cpu" or not segments_enabled or M == 0 or offsets.numel() < 3
            or M * R_tot * (K + N) <= 2 * _SEG_CALL):
        return None
    off = offsets.tolist()
    return segment_plan(plan, K, N, R_tot, [b - a for a, b in zip(off[:-1], off[1:])])


def _keep_scale(seed, M, K, plan, pk, dropout, device):
    """None (no dropout) or the (M, K) float32 keep/(1−p_k) of each token's adapter k; the mask is drawn from
    ``seed`` (fastlora.core.dropout.draw_keep: on the CPU a generator seeded with it), again in backward."""
    if not dropout:
        return None
    k = plan.ids.long().clamp(min=0)                  # base-only tokens: any row (their LoRA term is unused)
    p_rows, inv_rows = pk[k, 0], pk[k, 1]
    return draw_keep(seed, M, K, p_rows, device, torch.float32).mul_(inv_rows[:, None])


def multi_torch_forward(x, weight, bias, lora_A, lora_B, offsets, scalings, plan, r_max, pk, dropout, seed,
                        fan_in_fan_out, save_s):
    K, R_tot = x.shape[-1], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    w = weight_nk(weight, fan_in_fan_out)
    y = torch.addmm(bias.to(x.dtype), x2, w.t()) if bias is not None else x2 @ w.t()
    ks = _keep_scale(seed, M, K, plan, pk, dropout, x.device)
    d = x2.to(lora_A.dtype) if ks is None else x2.to(lora_A.dtype) * ks.to(lora_A.dtype)
    segs = _segments(plan, x, M, K, y.shape[1], R_tot, offsets)
    if segs is not None:
        S = _segmented_forward(segs, y, d, lora_A, lora_B, offsets, scalings, r_max, save_s)
        return y.reshape(*x.shape[:-1], w.shape[0]), S
    ids = plan.ids
    S_all = d @ lora_A.t()                                         # (M, R_tot): every adapter, every token
    colscale = _column_masks(offsets, scalings, ids, R_tot)
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


def multi_torch_backward(dy, x, weight, lora_A, lora_B, offsets, scalings, plan, S, pk, dropout, seed,
                         fan_in_fan_out, needs_dx, needs_dA, needs_dB):
    """(dx, dA (R_tot, K), dB (N, R_tot)); None where not needed. Dense-masked like multi_torch_forward."""
    K, N, R_tot, ad = x.shape[-1], dy.shape[-1], lora_A.shape[0], lora_A.dtype
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    w = weight_nk(weight, fan_in_fan_out)
    ks = _keep_scale(seed, x2.shape[0], K, plan, pk, dropout, x.device)
    segs = _segments(plan, x, x2.shape[0], K, N, R_tot, offsets)
    if segs is not None:
        return _segmented_backward(segs, dy2, x2, w, lora_A, lora_B, offsets, scalings, S, ks, x.shape,
                                   needs_dx, needs_dA, needs_dB)
    ids = plan.ids
    colscale = _column_masks(offsets, scalings, ids, R_tot)
    colscale = colscale.to(ad)
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


# ---------------------------------------------------------------------------
# CPU: per-adapter segments (ids read on the host, which costs nothing there)
# ---------------------------------------------------------------------------

# Cost model in multiply-adds. Dense: M·R_tot·(K+N). Segments: Σ_runs len·r_k·(K+N), plus CALL per run (two small
# GEMMs and their slicing) and, when the token order is fragmented and tokens are gathered by adapter first,
# COPY per element gathered and scattered back (M·(K+N); fresh CPU buffers of that size page-fault).
# Rough constants for one CPU thread, set from paired timings (decode 32 adapters × 1 token and prefill 8 × 64
# tokens at d 2048: segments beat dense masking in both; a toy layer stays dense).
_SEG_CALL = 300_000
_SEG_COPY = 16


def segment_plan(plan, K, N, R_tot, ranks):
    """None (use dense masking) or (order, runs, sizes): runs [(k, lo, hi)] of one adapter k ≥ 0 each, over the
    tokens in their own order (order None) or gathered by adapter (order = the plan's sorted_rows), whichever the
    cost model finds cheapest; ``sizes`` cut the M tokens into the runs and the gaps between them (one
    ``split`` per tensor instead of a slice per run). Reads the plan on the host (CPU), once per plan."""
    _, unsorted, by_adapter = plan.host_runs()
    M = plan.M
    dense = M * R_tot * (K + N)
    flops = sum((hi - lo) * ranks[k] for k, lo, hi in unsorted) * (K + N)
    cost, gathered = flops + _SEG_CALL * len(unsorted), False
    if len(unsorted) > 2 * len(by_adapter):              # fragmented: gather tokens by adapter?
        cost_sorted = flops + _SEG_CALL * len(by_adapter) + _SEG_COPY * M * (K + N)
        if cost_sorted < cost:
            cost, gathered = cost_sorted, True
    if cost >= dense:
        return None
    key = ("cuts", gathered)
    cuts = plan._host.get(key)
    if cuts is None:
        cuts = plan._host[key] = _cuts(by_adapter if gathered else unsorted, M)
    return (plan.sorted_rows.long() if gathered else None, *cuts)


def _cuts(runs, M):
    """(runs as [(k, piece index)], piece sizes covering 0 … M) for Tensor.split."""
    sizes, at, prev = [], [], 0
    for k, lo, hi in runs:
        if lo > prev:
            sizes.append(lo - prev)
        at.append((k, len(sizes)))
        sizes.append(hi - lo)
        prev = hi
    if prev < M:
        sizes.append(M - prev)
    return at, sizes


_VIEWS: dict = {}    # id(packed A) -> (weakref(packed A), signature, views); dropped with the packed A


def _adapter_views(lora_A, lora_B, offsets):
    """[(A_kᵀ (K, r_k), B_kᵀ (r_k, N))] per adapter: views of the packed (detached) tensors, cached per packed A
    (a bank changes its adapters only by installing new tensors), so a call slices nothing. In training the op
    gets a fresh view of the bank's packed A per call (AdapterBank.packed): the cache is keyed on what it views."""
    # the storages and strides too: they identify B, and the cached views keep the storages alive, so an address
    # cannot be reused meanwhile
    sig = (tuple(offsets.tolist()), lora_A.data_ptr(), lora_B.data_ptr(), lora_A.stride(), lora_B.stride(),
           lora_A.dtype, lora_B.dtype)
    owner = lora_A if lora_A._base is None else lora_A._base
    key = id(owner)
    hit = _VIEWS.get(key)
    if hit is None or hit[0]() is not owner or hit[1] != sig:
        A, B, off = lora_A.detach(), lora_B.detach(), sig[0]
        views = [(A[a:b].t(), B[:, a:b].t()) for a, b in zip(off[:-1], off[1:])]
        hit = _VIEWS[key] = (weakref.ref(owner, lambda _, k=key: _VIEWS.pop(k, None)), sig, views)
    return hit[2]


def _gather(t, order):
    return t if order is None else t.index_select(0, order)


def _scatter(t, order):
    return t if order is None else torch.empty_like(t).index_copy_(0, order, t)


def _segmented_forward(segs, y, d, lora_A, lora_B, offsets, scalings, r_max, save_s):
    """y (M, N) += s_k·(d·A_kᵀ)·B_kᵀ run by run; returns S (M, r_max) float32 (or an empty one)."""
    order, at, sizes = segs
    M = d.shape[0]
    sc, views = scalings.tolist(), _adapter_views(lora_A, lora_B, offsets)
    Ss = torch.zeros((M if save_s else 0, r_max), dtype=torch.float32)
    dp, sp = _gather(d, order).split(sizes), (Ss.split(sizes) if save_s else None)
    tp = y.split(sizes) if order is None else order.split(sizes)      # rows of y, or their indices
    same = y.dtype == lora_B.dtype
    for k, i in at:
        At, Bt = views[k]
        Sk = torch.mm(dp[i], At)
        if save_s:
            sp[i][:, :At.shape[1]] = Sk
        if order is not None:       # gathered tokens: their LoRA term is added back at their rows
            y.index_add_(0, tp[i], torch.mm(Sk, Bt).to(y.dtype), alpha=sc[k])
        elif same:
            tp[i].addmm_(Sk, Bt, alpha=sc[k])
        else:
            tp[i].add_(torch.mm(Sk * sc[k], Bt).to(y.dtype))
    return _scatter(Ss, order) if save_s else Ss


def _segmented_backward(segs, dy2, x2, w, lora_A, lora_B, offsets, scalings, S, ks, x_shape,
                        needs_dx, needs_dA, needs_dB):
    order, at, sizes = segs
    ad = lora_A.dtype
    off, sc = offsets.tolist(), scalings.tolist()
    views = _adapter_views(lora_A, lora_B, offsets)
    dys = _gather(dy2, order).to(ad).split(sizes)
    Ss = _gather(S, order).to(ad).split(sizes) if needs_dB else None
    d = x2.to(ad) if ks is None else x2.to(ad) * ks.to(ad)
    ds = _gather(d, order).split(sizes) if needs_dA else None
    dA = torch.zeros_like(lora_A) if needs_dA else None
    dBt = lora_B.new_zeros(lora_B.shape[::-1]) if needs_dB else None          # dBᵀ: row slices per adapter
    lxs = torch.zeros(x2.shape, dtype=ad) if needs_dx else None
    lp = lxs.split(sizes) if needs_dx else None
    for k, i in at:
        a, b = off[k], off[k + 1]
        At, Bt = views[k]
        dSk = torch.mm(dys[i], Bt.t()) * sc[k]                         # (len, r_k) = s_k·dY·B_k
        if needs_dB:
            dBt[a:b].addmm_(Ss[i][:, :b - a].t(), dys[i], alpha=sc[k])
        if needs_dA:
            dA[a:b].addmm_(dSk.t(), ds[i])
        if needs_dx:
            torch.mm(dSk, At.t(), out=lp[i])
    dx = None
    if needs_dx:
        lx = _scatter(lxs, order)
        if ks is not None:
            lx = lx * ks.to(ad)
        dx = torch.addmm(lx.to(dy2.dtype), dy2, w.to(dy2.dtype)).reshape(x_shape)
    return dx, dA, (dBt.t() if needs_dB else None)


__all__ = ["multi_torch_forward", "multi_torch_backward", "segment_plan"]
