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
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


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


def _backward(ctx, grad_out, grad_lse):
    pkg = _registry.get(ctx.package)
    if pkg is None:
        raise AttnError(f"attn::run backward: package {ctx.package} was freed; keep the "
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
    # The kernels take delta = rowsum(dO * O); a gradient reaching the lse
    # would change it per row, which they do not take (one check, a sync,
    # only where the caller asked for the lse).
    if ctx.lse_mode == LSE_RETURNED and grad_lse is not None and \
            bool(grad_lse.ne(0).any()):
        raise AttnError(f"package {name}: the backward pass takes no gradient through "
                        "the lse; detach the lse before using it in a loss")
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = grad_out.to(q.dtype).contiguous()
    dq, dk, dv = pkg.backward(q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                              grad_out, lengths=lengths, key_bias=key_bias)
    wanted = ctx.needs_input_grad
    return (dq.to(q.dtype) if wanted[0] else None, dk.to(k.dtype) if wanted[1] else None,
            dv.to(v.dtype) if wanted[2] else None, None, None, None, None, None)


run.register_autograd(_backward, setup_context=_setup_context)
