"""One registration for every op: the torch.library custom ops ``fastlora::<name>_fwd`` / ``_bwd``, their fake
kernels and their autograd formula, made from a forward / backward pair.

    fwd, bwd = register_op("lora_linear", forward, forward_fake, backward, backward_fake, save=save, grads=grads)

forward(*inputs) -> tuple of tensors        the op's outputs (y first, then what backward needs, e.g. S)
backward(*args) -> tuple of tensors / None  the gradients; None (not asked for) becomes a fresh empty tensor, as
                                            a custom op's outputs may not alias each other or an input
forward_fake, backward_fake                 the same signatures, shapes and dtypes only (torch.compile's tracing);
                                            backward_fake may return None likewise
save(ctx, inputs, outputs)                  what backward needs, kept on ctx (torch's setup_context)
grads(ctx, bwd, *output_grads)              one gradient per input (None where none), from ``bwd``: the
                                            registered backward op, called on what ``save`` kept

forward and backward carry type annotations: torch.library reads the op schema from them. torch.compile traces the
two ops (no graph break, autograd wired through ``grads``); eager calls skip the dispatcher and run each op file's
forward directly (inference) or its autograd.Function (training), which keeps eager-only state the op schema
cannot carry (a CPU dropout mask bit-packed, a batch-plan object, a quantized layer to dequantize again).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import Tensor


def _fill(out, args) -> tuple:
    """``out`` with every None replaced by a fresh empty tensor on the device of the first tensor argument."""
    like = next(a for a in args if isinstance(a, Tensor))
    return tuple(like.new_empty(0) if t is None else t for t in out)


def register_op(name: str, forward: Callable, forward_fake: Callable, backward: Callable, backward_fake: Callable,
                *, save: Callable, grads: Callable):
    """(fwd, bwd): the custom ops ``fastlora::{name}_fwd`` and ``fastlora::{name}_bwd``, registered with their fake
    kernels and ``fwd``'s autograd (see the module docstring for the arguments)."""
    fwd = torch.library.custom_op(f"fastlora::{name}_fwd", mutates_args=())(forward)
    fwd.register_fake(forward_fake)

    @functools.wraps(backward)
    def backward_op(*args):
        return tuple(t.contiguous() for t in _fill(backward(*args), args))

    # the schema is backward's signature, its annotations evaluated where backward was written
    backward_op.__signature__ = inspect.signature(backward, eval_str=True)

    @functools.wraps(backward_fake)
    def backward_fake_op(*args):
        return _fill(backward_fake(*args), args)

    bwd = torch.library.custom_op(f"fastlora::{name}_bwd", mutates_args=())(backward_op)
    bwd.register_fake(backward_fake_op)
    torch.library.register_autograd(f"fastlora::{name}_fwd", lambda ctx, *g: grads(ctx, bwd, *g), setup_context=save)
    return fwd, bwd


__all__ = ["register_op"]
