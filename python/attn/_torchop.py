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

Forward only. Eager calls on tensors that require grad (with grad mode on)
go through the operator too, so that the output carries a backward node:
a backward pass through it raises AttnError saying so, instead of
returning gradients that silently leave attention out.
"""
from typing import Optional, Tuple

import torch

from . import AttnError, _registry


@torch.library.custom_op("attn::run", mutates_args=())
def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        lengths: Optional[torch.Tensor], key_bias: Optional[torch.Tensor],
        key_ids: Optional[torch.Tensor], package: int,
        return_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    pkg = _registry.get(package)
    if pkg is None:
        raise AttnError(f"attn::run: package {package} was freed; keep the Package "
                        "alive while compiled code calls it")
    if return_lse:
        return pkg._call_torch(q, k, v, lengths, True, None, key_bias, key_ids)
    out = pkg._call_torch(q, k, v, lengths, False, None, key_bias, key_ids)
    return out, q.new_empty((0,), dtype=torch.float32)


@run.register_fake
def _(q, k, v, lengths, key_bias, key_ids, package, return_lse):
    lse_shape = q.shape[:-1] if return_lse else (0,)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


def call(pkg, q, k, v, lengths, return_lse, out, key_bias, key_ids):
    """Package.__call__ through the operator: the same arguments and results
    (the operator's schema takes lengths as a tensor; Package._torch_args
    checks and converts every argument inside it)."""
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, device=q.device)
    res, lse = torch.ops.attn.run(q, k, v, lengths, key_bias, key_ids, pkg._id, return_lse)
    if out is not None:
        out.copy_(res)
        res = out
    return (res, lse) if return_lse else res


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_out, grad_lse):
    raise AttnError("attn packages compute the forward pass only: there is no backward "
                    "through attn::run; call the package under torch.no_grad() (or on "
                    "detached tensors) for inference")


run.register_autograd(_backward, setup_context=_setup_context)

