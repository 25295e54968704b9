"""attn packages as a PyTorch operator (attn::run), so that torch.compile
puts a package call into its graph instead of breaking the graph at the
runtime's ctypes call: `fullgraph=True` compiles, and mode="reduce-overhead"
captures the call in its CUDA graphs.

Package.__call__ routes here while torch.compile traces, and for calls on
tensors that require grad (below); other eager calls take the direct path
(no dispatcher overhead). The operator names the package by its registry
number (attn._registry), a constant of the traced graph; its fake
implementation gives the output shapes for tracing: out like q, and the
LSE [B, H, Lq] (float32) or an empty tensor.

Eager calls on tensors that require grad (with grad mode on) go through
the operator too, so that the output carries a backward node. For a
package compiled with "backward": true that node runs the package's GPU
backward kernels (Package.backward: the forward's lse is computed for it
even where the caller did not ask for it) and returns dq, dk and dv in
the inputs' dtypes. For any other package, and for gradients that reach
key_bias or the lse, it raises AttnError saying why, instead of returning
gradients that silently leave attention out.

The backward kernels are an operator of their own (attn::run_backward,
with a fake implementation), so that torch.compile's AOTAutograd traces
the backward graph with fake tensors and calls the kernels when the
compiled backward runs: training under torch.compile takes the same
kernels as eager training. The check that no gradient reaches the lse
reads the gradient's values, so it runs inside that operator too.
"""
from typing import Optional, Tuple

import torch

from . import AttnError, _registry, _torch_needs_grad


LSE_NONE, LSE_RETURNED, LSE_FOR_BACKWARD = 0, 1, 2


@torch.library.custom_op("attn::run", mutates_args=())
def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        lengths: Optional[torch.Tensor], key_bias: Optional[torch.Tensor],
        key_ids: Optional[torch.Tensor], package: int,
        lse_mode: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """lse_mode: LSE_NONE (an empty lse), LSE_RETURNED (the caller's), or
    LSE_FOR_BACKWARD (computed for the backward pass only, so no gradient
    can reach it)."""
    pkg = _registry.get(package)
    if pkg is None:
        raise AttnError(f"attn::run: package {package} was freed; keep the Package "
                        "alive while compiled code calls it")
    if lse_mode != LSE_NONE:
        return pkg._call_torch(q, k, v, lengths, True, None, key_bias, key_ids)
    out = pkg._call_torch(q, k, v, lengths, False, None, key_bias, key_ids)
    return out, q.new_empty((0,), dtype=torch.float32)


@run.register_fake
def _(q, k, v, lengths, key_bias, key_ids, package, lse_mode):
    lse_shape = q.shape[:-1] if lse_mode != LSE_NONE else (0,)
    # out in q's layout, as Package._call_torch makes it.
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def call(pkg, q, k, v, lengths, return_lse, out, key_bias, key_ids):
    """Package.__call__ through the operator: the same arguments and results
    (the operator's schema takes lengths as a tensor; Package._torch_args
    checks and converts every argument inside it). Where autograd records
    the call and the package has a backward pass, the operator returns the
    lse as well: the backward kernels need it."""
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, device=q.device)
    lse_mode = LSE_NONE
    if return_lse:
        lse_mode = LSE_RETURNED
    elif pkg.has_backward and _torch_needs_grad(q, k, v):
        lse_mode = LSE_FOR_BACKWARD
    res, lse = torch.ops.attn.run(q, k, v, lengths, key_bias, key_ids, pkg._id, lse_mode)
    if out is not None:
        out.copy_(res)
        res = out
    return (res, lse) if return_lse else res


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, key_bias, key_ids, package, lse_mode = inputs
    out, lse = output
    ctx.package, ctx.lse_mode = package, lse_mode
    ctx.save_for_backward(q, k, v, out, lse, lengths, key_bias)


@torch.library.custom_op("attn::run_backward", mutates_args=())
def run_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, grad_out: torch.Tensor,
                 grad_lse: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                 key_bias: Optional[torch.Tensor],
                 package: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The package's backward kernels: dq, dk, dv in float32, or where the
    package stores gradients (Package.stores_gradients) in the inputs' dtype
    and layout (torch.empty_like). grad_lse is the gradient that reached a
    returned lse (None where the lse was computed for the backward only); it
    must be zero."""
    pkg = _registry.get(package)
    if pkg is None:
        raise AttnError(f"attn::run backward: package {package} was freed; keep the "
                        "Package alive until the backward pass")
    name = pkg.manifest["name"]
    # The kernels take delta = rowsum(dO * O); a gradient reaching the lse
    # would change it per row, which they do not take (one check, a sync,
    # only where the caller asked for the lse).
    if grad_lse is not None and bool(grad_lse.ne(0).any()):
        raise AttnError(f"package {name}: the backward pass takes no gradient through "
                        "the lse; detach the lse before using it in a loss")
    return pkg.backward(q, k, v, out, lse, grad_out, lengths=lengths, key_bias=key_bias,
                        grads=_new_grads(pkg, q, k, v))


def _new_grads(pkg, q, k, v):
    """The gradients run_backward returns, new: in the inputs' dtype and
    layout where the package stores them (no float32 pass), else float32."""
    if pkg is not None and pkg.stores_gradients:
        return tuple(torch.empty_like(x) for x in (q, k, v))
    return tuple(torch.empty(x.shape, dtype=torch.float32, device=x.device)
                 for x in (q, k, v))


@run_backward.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, lengths, key_bias, package):
    return _new_grads(_registry.get(package), q, k, v)


def _backward(ctx, grad_out, grad_lse):
    # A package number that changed between compiles of one function is a
    # symbolic int while AOTAutograd traces this backward: int() makes it
    # the traced graph's constant again (a guard on it).
    package = int(ctx.package)
    pkg = _registry.get(package)
    if pkg is None:
        raise AttnError(f"attn::run backward: package {package} was freed; keep the "
                        "Package alive until the backward pass")
    name = pkg.manifest["name"]
    if not pkg.has_backward:
        raise AttnError(f"package {name} computes the forward pass only: compile it with "
                        "\"backward\": true (a GPU target) for gradients through it, or call it "
                        "under torch.no_grad() (or on detached tensors) for inference")
    if ctx.needs_input_grad[4]:
        raise AttnError(f"package {name}: key_bias gets no gradient from the backward "
                        "pass; pass it detached")
    q, k, v, out, lse, lengths, key_bias = ctx.saved_tensors
    if lse.numel() == 0:
        raise AttnError(f"package {name}: the forward call kept no lse for the "
                        "backward pass")
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The kernels read q, k, v and out in their layouts, as the forward did,
    # and grad_out in q's (Package.backward copies it there where its own
    # differs; a [B, L, E] model's grad_out, viewed as [B, H, L, D], has
    # out's layout, which follows q's).
    grad_out = grad_out.to(q.dtype)
    returned = grad_lse if ctx.lse_mode == LSE_RETURNED else None
    dq, dk, dv = torch.ops.attn.run_backward(q, k, v, out, lse, grad_out, returned,
                                             lengths, key_bias, package)
    # Each gradient in its input's dtype and layout: as the kernels stored
    # it, or from float32 in one pass (a [B, H, L, D] view of a [B, L, H, D]
    # tensor gets a gradient whose transpose back is a view).
    like = lambda g, x: g if g.dtype == x.dtype else torch.empty_like(x).copy_(g)
    wanted = ctx.needs_input_grad
    return (like(dq, q) if wanted[0] else None, like(dk, k) if wanted[1] else None,
            like(dv, v) if wanted[2] else None, None, None, None, None, None)


run.register_autograd(_backward, setup_context=_setup_context)


def _views_of(x, base):
    """Whether x's autograd history is a chain of views down to base's node
    (base's grad_fn, or its AccumulateGrad where base is a leaf)."""
    node = x.grad_fn
    for _ in range(16):
        if node is None:
            return False
        if node is base.grad_fn or getattr(node, "variable", None) is base:
            return True
        parents = node.next_functions
        node = parents[0][0] if parents else None
    return False


def _fused_projection(q, k, v):
    """The tensor of one fused projection [B, L, (H + 2 Hkv) D] whose three
    parts q [B, H, L, D], k and v [B, Hkv, L, D] view as heads (qkv.view(B,
    L, 3, H, D).unbind(2) transposed, or split along the last dimension and
    viewed per head; the projection may itself be a view, as nn.Linear's
    output on [B, L, E] is of its [B*L, 3E] product), where autograd records
    each as a view of it and each takes its gradient through it; None
    otherwise (other layouts, a part detached or made under no_grad, parts
    that leave some of the projection out)."""
    base = q._base
    if base is None or k._base is not base or v._base is not base \
            or not base.requires_grad or not base.is_contiguous() or q.dim() != 4:
        return None
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if tuple(k.shape) != (B, Hkv, L, D) or v.shape != k.shape:
        return None
    C = (H + 2 * Hkv) * D
    if base.numel() != B * L * C:
        return None
    want = (L * C, D, C, 1)
    for x, first in ((q, 0), (k, H * D), (v, (H + Hkv) * D)):
        if any(n > 1 and st != w for n, st, w in zip(x.shape, x.stride(), want)) or \
                x.data_ptr() != base.data_ptr() + first * base.element_size() or \
                not _views_of(x, base):
            return None
    return base


def _projection_parts(qkv, H, Hkv, D):
    """q, k and v: the head views of qkv [B, L, (H + 2 Hkv) D]."""
    parts = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    return tuple(x.unflatten(-1, (x.shape[-1] // D, D)).transpose(1, 2) for x in parts)


class _FusedProjectionRun(torch.autograd.Function):
    """pkg(q, k, v) on the parts of one fused projection (_fused_projection),
    for packages that store their gradients: one backward node on the
    projection, whose gradient the backward kernels write in place, part by
    part (autograd through the parts would assemble it from three gradients
    in a pass of its own). out [B, L, H, D] is returned in q's dimension
    order, so a model's merge of the heads back to [B, L, H * D] is a view."""

    @staticmethod
    def forward(ctx, base, pkg, dims, lengths, key_bias):
        B, L, H, Hkv, D = dims
        qkv = base.view(B, L, (H + 2 * Hkv) * D)
        out = torch.empty(B, L, H, D, device=base.device, dtype=base.dtype)
        _, lse = pkg._call_torch(*_projection_parts(qkv, H, Hkv, D), lengths, True,
                                 out.transpose(1, 2), key_bias)
        ctx.pkg, ctx.dims = pkg, dims
        ctx.save_for_backward(base, out, lse, lengths, key_bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        base, out, lse, lengths, key_bias = ctx.saved_tensors
        B, L, H, Hkv, D = ctx.dims
        qkv = base.view(B, L, (H + 2 * Hkv) * D)
        grad_qkv = torch.empty(qkv.shape, device=base.device, dtype=base.dtype)
        ctx.pkg.backward(*_projection_parts(qkv, H, Hkv, D), out.transpose(1, 2), lse,
                         grad.to(base.dtype).transpose(1, 2), lengths=lengths,
                         key_bias=key_bias, grads=_projection_parts(grad_qkv, H, Hkv, D))
        return grad_qkv.view(base.shape), None, None, None, None


def projection_call(pkg, q, k, v, lengths, key_bias):
    """pkg(q, k, v) through _FusedProjectionRun where q, k and v are the parts
    of one fused projection and the package stores its gradients (eager
    autograd; not with key_bias that requires grad, which gets none); None
    where that does not apply (the caller takes attn::run)."""
    if not pkg.stores_gradients or (key_bias is not None and key_bias.requires_grad):
        return None
    base = _fused_projection(q, k, v)
    if base is None:
        return None
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, device=q.device)
    B, H, L, D = q.shape
    out = _FusedProjectionRun.apply(base, pkg, (B, L, H, k.shape[1], D), lengths,
                                    key_bias)
    return out.transpose(1, 2)


class _RingRank(torch.autograd.Function):
    """One rank's ring call (Package.run_rank) on tensors that require grad:
    the forward keeps the lse, and the backward runs the rank's part of the
    ring backward (Package.run_rank_backward), a collective like the
    forward: every rank's loss.backward() must reach it, in the same order
    as its other ring calls. (A plain autograd Function: torch.compile
    breaks the graph around it.)"""

    @staticmethod
    def forward(ctx, pkg, q, k, v, lengths, return_lse, wait, timeout):
        if not pkg.has_lse:
            raise AttnError(f"package {pkg.manifest['name']} was compiled with "
                            "\"lse\": false; its backward pass needs the lse")
        out, lse = pkg.run_rank(q.detach(), k.detach(), v.detach(), lengths=lengths,
                                return_lse=True, wait=wait, timeout=timeout)
        ctx.pkg, ctx.wait, ctx.timeout, ctx.return_lse = pkg, wait, timeout, return_lse
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        pkg = ctx.pkg
        name = pkg.manifest["name"]
        if not pkg.has_backward:
            raise AttnError(f"package {name} computes the forward pass only: compile it with "
                            "\"backward\": true for gradients through the ring, or call "
                            "run_rank under torch.no_grad() for inference")
        if ctx.return_lse and grad_lse is not None and bool(grad_lse.ne(0).any()):
            raise AttnError(f"package {name}: the backward pass takes no gradient through "
                            "the lse; detach the lse before using it in a loss")
        q, k, v, out, lse, lengths = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = pkg.run_rank_backward(
            q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
            grad_out.to(q.dtype).contiguous(), lengths=lengths, wait=ctx.wait,
            timeout=ctx.timeout)
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None,
                None)


def ring_rank(pkg, q, k, v, lengths, return_lse, wait, timeout):
    """Package.run_rank recorded for autograd (_RingRank)."""
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, device=q.device, dtype=torch.int32)
    out, lse = _RingRank.apply(pkg, q, k, v, lengths, return_lse, wait, timeout)
    return (out, lse) if return_lse else out
