"""AdapterBank: many LoRA adapters of one linear layer, packed along the rank WITHOUT padding.

Storage (what the gather kernels read), for adapters k = 0 … n−1 of ranks r_k, R_tot = Σ r_k:

    lora_A    (R_tot, K)   rows off[k] … off[k+1]−1 are adapter k's A_k (r_k, K)        buffer
    lora_B    (N, R_tot)   columns off[k] … off[k+1]−1 are adapter k's B_k (N, r_k)     buffer,
                           stored transposed (strides (1, N)): each B_kᵀ is one contiguous (r_k, N) block
    offsets   (n+1,) int32 off[0] = 0, off[k+1] = off[k] + r_k                         buffer
    scalings  (n,) float32 s_k = alpha_k / r_k, or alpha_k / √r_k (rsLoRA)             buffer (runtime values)

What trains: each adapter's A_k and B_k is its own nn.Parameter (``lora_A_params[name]``,
``lora_B_params[name]``, what ``parameters()`` and ``state_dict()`` hold), a VIEW of its block of the packed
buffers: an optimizer's in-place update of A_k is what the kernels read next, with no copy. Each Parameter
has its own ``requires_grad``, as PEFT's per-adapter Parameters do: a frozen adapter gets no gradient, so no
optimizer over ``parameters()`` changes it (AdamW's weight decay skips a Parameter without a gradient), while
the kernels still read one packed A and one packed B per layer. With grad enabled, ``packed()`` hands the op
the packed buffers as views that carry autograd back to the trainable adapters' Parameters only (the packed
gradient is computed once per layer, then cut into their blocks). Module.to() / half() / cuda(),
load_state_dict (also assign=True), deepcopy and pickling keep the Parameters attached to the packed
buffers; a Parameter replaced behind the bank's back (its ``.data`` assigned by hand, torch.func.functional_call)
is not what the kernels read, and training through it is a RuntimeError.

Adapter k is addressed by its index k (position in ``names``); −1 means "base model only".
Changing the set of adapters (add / remove / replace) builds new packed tensors: indices of later
adapters shift on remove; the Parameters of the adapters a change keeps stay the same objects (an
optimizer over them keeps working; a replaced or removed adapter's old Parameters leave the bank).
Every change is validated completely before anything is modified, so a failed call leaves the bank as it
was. A scaling change (``set_scaling``) is in place: no recompilation, CUDA graphs see the new value.

Why B is stored transposed: every reader walks one adapter's B_k along N (the expand, the dS = dY·B_k pass,
dB_k); a contiguous B_kᵀ block makes those reads unit-stride (the CPU timing behind it: docs/benchmarks.md).

Dtype policy: adapters are stored in the bank's ``dtype`` (float32 by default, PEFT's choice for a
half base; or the base model's dtype); weights given in another float dtype are cast on entry.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn


BANK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # what a bank stores (inputs: any float, cast)
BASE = "__base__"   # PEFT's name for "no adapter" in mixed batches


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


class AdapterBank(nn.Module):
    """LoRA adapters for one layer with in_features K and out_features N (see the module docstring).

    requires_grad: whether adapters added later train (``add(..., requires_grad=)`` decides per adapter,
    ``requires_grad_(flag, adapter=name)`` changes one adapter, ``requires_grad_(flag)`` all of them).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, requires_grad: bool = False):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype not in BANK_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        _check_flag(requires_grad, "requires_grad")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("lora_A", torch.empty(0, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_B", torch.empty(0, out_features, dtype=dtype, device=device).t(),
                             persistent=False)
        self.lora_A_params = nn.ParameterDict()     # name -> A_k (r_k, K), a view of lora_A's rows
        self.lora_B_params = nn.ParameterDict()     # name -> B_k (N, r_k), a view of lora_B's columns
        self.register_buffer("offsets", torch.zeros(1, dtype=torch.int32, device=device))
        self.register_buffer("scalings", torch.zeros(0, dtype=torch.float32, device=device))
        self._names: list[str] = []
        self._ranks: list[int] = []
        self._requires_grad = requires_grad          # for adapters added without requires_grad=
        self.register_load_state_dict_post_hook(AdapterBank._after_load)

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    @property
    def r_max(self) -> int:
        """Largest rank in the bank (0 when empty); host-known, sizes the S buffer and the grids."""
        return max(self._ranks, default=0)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def index(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(f"unknown adapter name {name!r}; the bank holds {self._names}")
        return self._names.index(name)

    def ids(self, names: Sequence[str | None], *, device=None, missing: str = "error") -> Tensor:
        """int32 adapter ids for a list of names; None or '__base__' -> −1 (base model only).

        ``missing="base"`` maps names this bank does not hold to −1 (PEFT's behaviour for a layer an
        adapter does not target); the default raises KeyError.
        """
        if isinstance(names, str):
            raise TypeError("names must be a sequence of adapter names, got a single str")
        if missing not in ("error", "base"):
            raise ValueError(f"missing must be 'error' or 'base', got {missing!r}")
        out = []
        for n in names:
            if n is None or n == BASE or (missing == "base" and n not in self._names):
                out.append(-1)
            else:
                out.append(self.index(n))
        return torch.tensor(out, dtype=torch.int32, device=device if device is not None else self.offsets.device)

    def adapter(self, name: str) -> tuple[nn.Parameter, nn.Parameter, float]:
        """(A_k (r_k, K), B_k (N, r_k), s_k) of the named adapter: its Parameters (views of the packed buffers)."""
        k = self.index(name)
        return self.lora_A_params[name], self.lora_B_params[name], float(self.scalings[k])

    def extra_repr(self) -> str:
        frozen = [n for n in self._names if not self._trains(n)]
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"adapters={dict(zip(self._names, self._ranks))}" + (f", frozen={frozen}" if frozen else ""))

    # ------------------------------------------------------------------ what trains
    def _trains(self, name: str) -> bool:
        return self.lora_A_params[name].requires_grad or self.lora_B_params[name].requires_grad

    def requires_grad_(self, requires_grad: bool = True, *, adapter: str | Sequence[str] | None = None):
        """Set ``requires_grad`` of the named adapter(s)' A and B; without ``adapter``, of every adapter and of
        those added later (nn.Module.requires_grad_). Unknown names raise KeyError and change nothing."""
        _check_flag(requires_grad, "requires_grad", " (one adapter: requires_grad_(flag, adapter=name))")
        if adapter is None:
            self._requires_grad = requires_grad
            return super().requires_grad_(requires_grad)
        names = [adapter] if isinstance(adapter, str) else adapter
        if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter must be an adapter name or a sequence of names, got {adapter!r}")
        for n in names:
            self.index(n)
        for n in names:
            self.lora_A_params[n].requires_grad_(requires_grad)
            self.lora_B_params[n].requires_grad_(requires_grad)
        return self

    def packed(self) -> tuple[Tensor, Tensor]:
        """(A (R_tot, K), B (N, R_tot)): the packed tensors the op reads. With grad enabled they are views that
        carry the op's packed gradients back to the trainable adapters' Parameters, each its own block (no
        copy); frozen adapters get none. Without grad (inference, decode): the buffers themselves. With grad, in
        eager mode, a Parameter that no longer views its block (replaced behind the bank's back, e.g. by
        torch.func.functional_call, whose tensors the kernels would never read) is a RuntimeError."""
        A, B = self.lora_A, self.lora_B
        if not torch.is_grad_enabled():
            return A, B
        pa, pb = self.lora_A_params._parameters, self.lora_B_params._parameters   # (not ParameterDict[name]: host time)
        return (_to_params(A, 0, self._names, self._ranks, [pa[n] for n in self._names]),
                _to_params(B, 1, self._names, self._ranks, [pb[n] for n in self._names]))

    # ------------------------------------------------------------------ keeping the Parameters on the buffers
    def _reattach(self) -> None:
        """Make every adapter Parameter a view of its block of the packed buffers again, the Parameter's values
        kept (after Module.to(), load_state_dict(assign=True), deepcopy / unpickling gave it storage of its own).
        The same Parameter objects: optimizers holding them keep working."""
        lo = 0
        with torch.no_grad():
            for name, r in zip(self._names, self._ranks):
                for p, view in ((self.lora_A_params[name], self.lora_A[lo:lo + r]),
                                (self.lora_B_params[name], self.lora_B[:, lo:lo + r])):
                    if not _same_view(p, view):
                        view.copy_(p.detach())
                        p.data = view
                lo += r

    @staticmethod
    def _after_load(bank, _incompatible_keys):
        bank._reattach()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._reattach()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reattach()

    # ------------------------------------------------------------------ changes
    def _checked(self, name, lora_A, lora_B, scaling, alpha, use_rslora):
        """Validate one adapter; returns (A, B, s) converted to the bank's dtype/device. Modifies nothing."""
        if not isinstance(name, str) or not name or name == BASE or "." in name:
            raise ValueError(f"adapter name must be a non-empty str other than {BASE!r}, without '.' (it names the "
                             f"adapter's Parameters, lora_A_params.<name>), got {name!r}")
        for an, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{an} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{an} must be a floating tensor, got {t.dtype}")
        K, N = self.in_features, self.out_features
        if lora_A.dim() != 2 or lora_A.shape[0] < 1 or lora_A.shape[1] != K:
            raise ValueError(f"lora_A of adapter {name!r} must have shape (r, {K}) with r >= 1, got {_shape(lora_A)}")
        r = lora_A.shape[0]
        if tuple(lora_B.shape) != (N, r):
            raise ValueError(f"lora_B of adapter {name!r} must have shape ({N}, {r}) (out_features, rank of "
                             f"lora_A), got {_shape(lora_B)}: rank mismatch")
        if scaling is not None and alpha is not None:
            raise ValueError("give scaling or alpha, not both")
        if alpha is not None:
            if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
                raise ValueError(f"alpha must be a finite number, got {alpha!r}")
            scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        elif scaling is None:
            scaling = 1.0
        if isinstance(scaling, Tensor):
            if scaling.numel() != 1:
                raise ValueError(f"scaling must be a number or a 1-element tensor, got shape {_shape(scaling)}")
            scaling = float(scaling)
        if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")
        dev = self.lora_A.device
        A = lora_A.detach().to(device=dev, dtype=self.dtype)
        B = lora_B.detach().to(device=dev, dtype=self.dtype)
        return A, B, float(scaling)

    def _commit(self, names, ranks, As, Bs, scales, params):
        """Pack and install. params[k]: adapter k's (A, B) Parameters, kept (re-pointed at the new buffers), or
        (requires_grad of A, of B) for new ones. All new tensors are built before any attribute changes."""
        dev, K, N = self.lora_A.device, self.in_features, self.out_features
        A = torch.cat(As, 0) if As else torch.empty(0, K, dtype=self.dtype, device=dev)
        Bt = torch.cat([b.t() for b in Bs], 0) if Bs else torch.empty(0, N, dtype=self.dtype, device=dev)
        A, B = A.contiguous(), Bt.contiguous().t()
        off = [0] + list(_cumsum(ranks))
        views = [(A[lo:hi], B[:, lo:hi]) for lo, hi in zip(off[:-1], off[1:])]
        keep = [(p, v) for pair, vs in zip(params, views) if isinstance(pair[0], nn.Parameter) for p, v in zip(pair, vs)]
        new = [pair if isinstance(pair[0], nn.Parameter) else
               (nn.Parameter(va, pair[0]), nn.Parameter(vb, pair[1])) for pair, (va, vb) in zip(params, views)]
        params_A = nn.ParameterDict({n: pa for n, (pa, _) in zip(names, new)})
        params_B = nn.ParameterDict({n: pb for n, (_, pb) in zip(names, new)})
        off_t = torch.tensor(off, dtype=torch.int32, device=dev)
        sc = torch.tensor(scales, dtype=torch.float32, device=dev)
        self.lora_A, self.lora_B = A, B
        with torch.no_grad():
            for p, v in keep:
                p.data = v
        self.lora_A_params, self.lora_B_params = params_A, params_B
        self.offsets, self.scalings = off_t, sc
        self._names, self._ranks = list(names), list(ranks)

    def _pieces(self):
        """(A_k's, B_k's (detached views of the packed buffers), scalings, (A, B) Parameters), in bank order."""
        A, B, off = self.lora_A.detach(), self.lora_B.detach(), [0] + list(_cumsum(self._ranks))
        return ([A[off[k]:off[k + 1]] for k in range(len(self))], [B[:, off[k]:off[k + 1]] for k in range(len(self))],
                self.scalings.tolist(), [(self.lora_A_params[n], self.lora_B_params[n]) for n in self._names])

    def add(self, name: str, lora_A: Tensor, lora_B: Tensor, *, scaling: float | None = None,
            alpha: float | None = None, use_rslora: bool = False, requires_grad: bool | None = None) -> int:
        """Add adapter ``name`` (A (r, K), B (N, r)); s = scaling, or alpha/r (alpha/√r with rsLoRA), default 1;
        requires_grad: whether it trains (default: the bank's ``requires_grad``).

        Returns its index. Raises ValueError if the name exists (use ``replace``).
        """
        A, B, s = self._checked(name, lora_A, lora_B, scaling, alpha, use_rslora)
        if name in self._names:
            raise ValueError(f"adapter {name!r} already exists; use replace() to change it")
        grad = self._requires_grad if requires_grad is None else _check_flag(requires_grad, "requires_grad")
        As, Bs, scales, params = self._pieces()
        self._commit(self._names + [name], self._ranks + [A.shape[0]], As + [A], Bs + [B], scales + [s],
                     params + [(grad, grad)])
        return len(self) - 1

    def replace(self, name: str, lora_A: Tensor, lora_B: Tensor, *, scaling: float | None = None,
                alpha: float | None = None, use_rslora: bool = False) -> int:
        """Replace adapter ``name`` (its rank may change; new Parameters, with the old ones' requires_grad);
        keeps its index."""
        k = self.index(name)
        A, B, s = self._checked(name, lora_A, lora_B, scaling, alpha, use_rslora)
        As, Bs, scales, params = self._pieces()
        As[k], Bs[k], scales[k] = A, B, s
        params[k] = tuple(p.requires_grad for p in params[k])
        ranks = list(self._ranks)
        ranks[k] = A.shape[0]
        self._commit(self._names, ranks, As, Bs, scales, params)
        return k

    def remove(self, name: str) -> None:
        """Remove adapter ``name``; adapters after it move down one index."""
        k = self.index(name)
        As, Bs, scales, params = self._pieces()
        keep = [i for i in range(len(self)) if i != k]
        self._commit([self._names[i] for i in keep], [self._ranks[i] for i in keep],
                     [As[i] for i in keep], [Bs[i] for i in keep], [scales[i] for i in keep], [params[i] for i in keep])

    def set_scaling(self, name: str, scaling: float) -> None:
        """Change s_k in place (the runtime scaling tensor; nothing recompiles)."""
        k = self.index(name)
        if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")
        with torch.no_grad():
            self.scalings[k] = float(scaling)

    # ------------------------------------------------------------------ PEFT
    @classmethod
    def from_peft_layer(cls, layer, *, dtype: torch.dtype | None = None) -> "AdapterBank":
        """A bank holding every adapter of a PEFT ``lora.Linear`` layer (weights copied; PEFT's scaling, and each
        lora_A / lora_B's requires_grad: adapters PEFT froze stay frozen)."""
        names = list(layer.lora_A.keys())
        if not names:
            raise ValueError("the PEFT layer holds no LoRA adapter")
        variants = [n for n in names if n in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(n)]
        if variants:
            raise ValueError(f"adapters {variants} of this PEFT layer are DoRA (or another LoRA variant), which the "
                             f"multi-adapter bank does not compute; serve them with fastlora.patch instead")
        A0 = layer.lora_A[names[0]].weight
        bank = cls(layer.in_features, layer.out_features, dtype=dtype or A0.dtype, device=A0.device)
        for n in names:
            A, B = layer.lora_A[n].weight, layer.lora_B[n].weight
            bank.add(n, A, B, scaling=float(layer.scaling[n]))
            bank.lora_A_params[n].requires_grad_(A.requires_grad)
            bank.lora_B_params[n].requires_grad_(B.requires_grad)
        return bank


class _ToParams(torch.autograd.Function):
    """packed -> a view of it (no copy) whose gradient goes, cut along ``dim`` into the blocks ``bounds`` (lo, r),
    to ``params``, the Parameters viewing those blocks: how the op's packed gradient reaches the trainable
    adapters only."""

    @staticmethod
    def forward(ctx, packed, dim, bounds, *params):
        ctx.dim, ctx.bounds = dim, bounds
        return packed.view_as(packed)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None, *(grad.narrow(ctx.dim, lo, r) for lo, r in ctx.bounds))


def _to_params(packed: Tensor, dim: int, names: list[str], ranks: list[int], params: list[nn.Parameter]) -> Tensor:
    """``packed`` itself when no Parameter of ``params`` (one per adapter, in bank order) requires grad; else its
    _ToParams view, differentiable in those that do. Eager: each Parameter must view its block of ``packed``."""
    # (not while tracing: data_ptr does not trace, and fake tensors have none; a traced bank is ours)
    check = type(packed) is Tensor and not torch.compiler.is_compiling()
    at, step = (packed.data_ptr(), packed.stride(dim) * packed.element_size()) if check else (0, 0)
    bounds, train, lo = [], [], 0
    for name, r, p in zip(names, ranks, params):
        if check and p.data_ptr() != at + lo * step:
            raise RuntimeError(f"adapter {name!r}: its {'lora_B' if dim else 'lora_A'} Parameter is not a view of the "
                               f"bank's packed buffer, which is what the kernels read (the Parameter or its .data was "
                               f"replaced, e.g. by torch.func.functional_call); change adapters through the bank "
                               f"(add / replace / load_state_dict)")
        if p.requires_grad:
            bounds.append((lo, r))
            train.append(p)
        lo += r
    return _ToParams.apply(packed, dim, bounds, *train) if train else packed


def _same_view(p: Tensor, view: Tensor) -> bool:
    return (p.data_ptr() == view.data_ptr() and p.shape == view.shape and p.stride() == view.stride()
            and p.dtype == view.dtype and p.device == view.device)


def _check_flag(flag, what: str, hint: str = "") -> bool:
    if not isinstance(flag, bool):
        raise TypeError(f"{what} must be a bool, got {flag!r}{hint}")
    return flag


def _cumsum(xs: Iterable[int]):
    t = 0
    for x in xs:
        t += x
        yield t


__all__ = ["AdapterBank", "BASE", "BANK_DTYPES"]
