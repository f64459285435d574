"""The batch plan of a multi-adapter call: which token uses which adapter, laid out for the kernels.

    plan = plan_batch(bank, adapter_ids, x)        once per model forward (MultiAdapterModel does it per call)
    y = layer(x, plan=plan)                        every MultiLoraLinear whose bank has the same adapters

One plan serves every layer whose bank holds the same adapters in the same order (as MultiAdapterModel's
banks, built from one PEFT model): the ids, the token order and the tile tables are computed once per
forward on the device (sort + searchsorted + cumsum on fixed-size tensors: no host sync, CUDA-graph
capturable), not once per layer. Everything lives in ONE int32 tensor, ``plan.data``:

    ids (M) | rows (M) | tile_adapter (T) | tile_lo (T) | tile_hi (T) | sorted_rows (M) | bounds (n+1)

    ids          adapter of token m (−1: base model only), tokens = x.shape[:-1] flattened
    rows         token order of the tiles: decode = 0…M−1; grouped = tokens stably sorted by adapter
    tile_*       tile t covers rows[tile_lo[t] : tile_hi[t]], all of adapter tile_adapter[t] (−1: no work)
    sorted_rows  tokens stably sorted by adapter (the per-adapter gradient reductions read segments of it)
    bounds       adapter k's tokens are sorted_rows[bounds[k] : bounds[k+1]]

Regimes, chosen from host-known sizes (never by timing): "decode" (one tile per token, in token order: T = M)
when tokens per adapter are few, else "grouped" (tiles of TILE_M tokens of one adapter, base-only tokens in
tiles of their own: T = cdiv(M, TILE_M) + n + 1, an upper bound; unused tiles are empty). Every token is in
exactly one tile (the expand kernel writes every row of the output). ``plan.update_(ids)`` refills the same
tensor for a new batch of the same shape (what a captured CUDA graph replays with).

On CPU the pure-torch path reads the plan on the host once (``host_runs``, cached on the plan), so every
layer of a forward shares those reads too.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .bank import BASE, AdapterBank

TILE_M = 16            # tokens per grouped tile = the shrink / expand kernels' BLOCK_M (kernels/multi_lora.py)
REGIMES = ("auto", "decode", "grouped")


def choose_regime(M: int, n: int, regime: str = "auto") -> str:
    """'decode' when tokens per adapter are few (< 4 on average), else 'grouped'. Host-known numbers only."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if regime != "auto":
        return regime
    return "decode" if M < 4 * max(n, 1) else "grouped"


def n_tiles(M: int, n: int, regime: str) -> int:
    """Tiles of a plan (host-known): decode M; grouped an upper bound, cdiv(M, TILE_M) + n + 1 (one partial
    tile per adapter and one for the base-only tokens at most)."""
    return M if regime == "decode" else -(-M // TILE_M) + n + 1


def expand_ids(ids: Tensor, x: Tensor, n: int) -> Tensor:
    """Per-token int32 ids (M,) from ids of shape x.shape[:-1] (per token) or x.shape[:1] (per sequence).

    Range [−1, n) is asserted on the device (torch._assert_async): immediate ValueError on CPU, a device-side
    assert on CUDA — never a host read, so the launch path stays capturable.
    """
    return _token_ids(ids, tuple(x.shape), x.device, n)


def _token_ids(ids: Tensor, x_shape: tuple, device, n: int) -> Tensor:
    """expand_ids for activations of shape ``x_shape`` on ``device`` (no tensor of that shape needed)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor of int32/int64 (or a list of adapter names), "
                        f"got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"adapter_ids must be on x's device {device}, got {ids.device}")
    lead = x_shape[:-1]
    if tuple(ids.shape) == lead:
        tok = ids.reshape(-1)
    elif len(x_shape) >= 3 and tuple(ids.shape) == lead[:1]:
        tok = ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
    else:
        per_seq = f" or {lead[:1]} (one per sequence)" if len(x_shape) >= 3 else ""
        raise ValueError(f"adapter_ids must have shape {lead} (one per token){per_seq} for x of shape "
                         f"{x_shape}, got {tuple(ids.shape)}")
    tok = tok.to(torch.int32)
    if tok.numel():
        msg = f"adapter_ids must be in [-1, {n}) (-1 = base model only; the bank holds {n} adapters)"
        try:
            torch._assert_async(((tok >= -1) & (tok < n)).all(), msg)
        except RuntimeError as e:
            raise ValueError(msg) from e
    return tok


def _pieces(ids: Tensor, n: int, regime: str) -> list[Tensor]:
    """The plan's sections (see the module docstring) from per-token int32 ids, fixed-size device ops only."""
    M, dev, i32 = ids.numel(), ids.device, torch.int32
    sorted_ids, order = torch.sort(ids, stable=True)
    sorted_rows = order.to(i32)
    bounds = torch.searchsorted(sorted_ids, torch.arange(n + 1, device=dev, dtype=ids.dtype), out_int32=True)
    if regime == "decode":
        ar = torch.arange(M, device=dev, dtype=i32)
        return [ids, ar, ids, ar, ar + 1, sorted_rows, bounds]
    # segment 0 = base-only tokens (sorted first), segment k + 1 = adapter k; every token is in one tile
    zero = torch.zeros(1, device=dev, dtype=i32)
    seg = torch.cat([zero, bounds])
    counts = seg[1:] - seg[:-1]
    tiles = (counts + (TILE_M - 1)) // TILE_M
    tile_end = torch.cumsum(tiles, 0, dtype=i32)
    t = torch.arange(n_tiles(M, n, regime), device=dev, dtype=i32)
    sg = torch.searchsorted(tile_end, t, right=True, out_int32=True)     # segment whose tile range holds t
    valid = sg <= n
    sc = sg.clamp(max=n)
    lo = seg[sc] + (t - (tile_end[sc] - tiles[sc])) * TILE_M
    hi = torch.minimum(lo + TILE_M, seg[sc + 1])
    return [ids, sorted_rows, torch.where(valid, sc - 1, -1).to(i32), torch.where(valid, lo, zero),
            torch.where(valid, hi, zero), sorted_rows, bounds]


class BatchPlan:
    """A batch's token → adapter plan for banks holding ``names`` (see the module docstring).

    Build it with ``plan_batch``; pass it as ``plan=`` to MultiLoraLinear / multi_lora_linear. The layer checks
    that the plan fits (same adapters in the same order, same tokens, same device) and raises otherwise.
    """

    tile_m = TILE_M

    def __init__(self, data: Tensor, lead: tuple, n: int, regime: str, names: tuple | None = None):
        self.data, self.lead, self.n, self.regime, self.names = data, tuple(lead), n, regime, names
        self.M = 1
        for d in self.lead:
            self.M *= d
        self.T = n_tiles(self.M, n, regime)
        self._host: dict = {}

    # sections of ``data`` (views)
    def _at(self, i: int, size: int) -> Tensor:
        return self.data.narrow(0, i, size)

    @property
    def ids(self) -> Tensor:
        return self._at(0, self.M)

    @property
    def rows(self) -> Tensor:
        return self._at(self.M, self.M)

    @property
    def tile_adapter(self) -> Tensor:
        return self._at(2 * self.M, self.T)

    @property
    def tile_lo(self) -> Tensor:
        return self._at(2 * self.M + self.T, self.T)

    @property
    def tile_hi(self) -> Tensor:
        return self._at(2 * self.M + 2 * self.T, self.T)

    @property
    def sorted_rows(self) -> Tensor:
        return self._at(2 * self.M + 3 * self.T, self.M)

    @property
    def bounds(self) -> Tensor:
        return self._at(3 * self.M + 3 * self.T, self.n + 1)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __repr__(self) -> str:
        return f"BatchPlan(tokens={self.lead}, adapters={self.n}, regime={self.regime!r}, device={self.device})"

    def update_(self, adapter_ids: Tensor) -> "BatchPlan":
        """Refill this plan in place for a new batch of the same shape (ids as ``plan_batch`` takes them, as a
        tensor on the plan's device): what a CUDA graph captured with this plan replays with."""
        ids = _token_ids(adapter_ids, (*self.lead, 1), self.device, self.n)
        self.data.copy_(torch.cat(_pieces(ids, self.n, self.regime)))
        self._host.clear()
        return self

    def check(self, x: Tensor, names: Sequence[str]) -> None:
        """Raise ValueError unless this plan fits a call on ``x`` with a bank holding ``names``."""
        if tuple(x.shape[:-1]) != self.lead:
            raise ValueError(f"plan was built for tokens of shape {self.lead}, x has shape {tuple(x.shape)}")
        if self.data.device != x.device:
            raise ValueError(f"plan is on {self.data.device}, x on {x.device}")
        if len(names) != self.n or (self.names is not None and tuple(names) != self.names):
            built = list(self.names) if self.names is not None else f"{self.n} adapters (given by index)"
            raise ValueError(f"plan was built for a bank holding {built}; this layer's bank holds {list(names)}")

    def host_runs(self) -> tuple[list, list, list]:
        """CPU only: (ids as a list, runs of equal ids in token order [(k, lo, hi)], runs in sorted order
        [(k, lo, hi)] over ``sorted_rows``), adapter tokens only; read once per plan, shared by every layer."""
        runs = self._host.get("runs")
        if runs is None:
            idl = self.ids.long()
            cut = [0] + (torch.nonzero(idl[1:] != idl[:-1]).flatten() + 1).tolist() + [self.M]
            ids_list = idl.tolist()
            unsorted = [(ids_list[lo], lo, hi) for lo, hi in zip(cut[:-1], cut[1:]) if ids_list[lo] >= 0]
            b = self.bounds.tolist()
            by_adapter = [(k, b[k], b[k + 1]) for k in range(self.n) if b[k + 1] > b[k]]
            runs = self._host["runs"] = (ids_list, unsorted, by_adapter)
        return runs


def names_list(names, what: str) -> list:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list with one adapter name per sequence, got the single str {names!r}; "
                        f"for one adapter on every sequence pass [{names!r}] * batch_size (as PEFT)")
    if not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a list with one adapter name per sequence, got {type(names).__name__}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold adapter names (str, or None / {BASE!r} for the base model), got {bad[0]!r}")
    return list(names)


def plan_batch(bank, adapter_ids: Tensor | Sequence[str | None], x: Tensor, *, regime: str = "auto") -> BatchPlan:
    """The plan of one batch for every layer whose bank holds ``bank``'s adapters in the same order.

    bank: a fastlora AdapterBank (its names and count are what the ids index). adapter_ids: int tensor of
    shape x.shape[:-1] (per token) or x.shape[:1] (per sequence), in [−1, len(bank)), or a list of adapter
    names per sequence (None / "__base__" = base model; names the bank lacks are an error). x: the
    activations the layers will see (only its shape and device are read). regime: "auto" (by shape),
    "decode" or "grouped".
    """
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"bank must be a fastlora AdapterBank, got {type(bank).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor of shape (..., in_features) (the layers' input)")
    n = len(bank)
    if not isinstance(adapter_ids, Tensor):
        adapter_ids = bank.ids(names_list(adapter_ids, "adapter_ids"), device=x.device)
    ids = expand_ids(adapter_ids, x, n)
    regime = choose_regime(ids.numel(), n, regime) if n else "decode"      # an empty bank: nothing to tile
    return BatchPlan(torch.cat(_pieces(ids, n, regime)), x.shape[:-1], n, regime, tuple(bank.names))


__all__ = ["BatchPlan", "plan_batch", "expand_ids", "choose_regime", "REGIMES", "TILE_M"]
