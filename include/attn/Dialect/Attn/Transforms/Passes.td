//===- Passes.td - attn transformation passes --------------*- tablegen -*-===//
//
// The compiler's pipeline, one small pass each: decompose a pattern into
// dense components, bufferize, tile with closed-form schedules, and lower the
// tiles to a fused online softmax.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_TRANSFORMS_PASSES
#define ATTN_TRANSFORMS_PASSES

include "mlir/Pass/PassBase.td"

def AttnDecompose : Pass<"attn-decompose"> {
  let summary = "Rewrite attn.attention as a sum of dense components";
  let description = [{
    Replaces each `attn.attention` by an online-softmax state that every
    component of its pattern updates in turn, then a finalize:

    ```mlir
    %o = attn.attention %q, %k, %v pattern(#attn.strided<stride = 8, local = 8>) ...
    ```
    becomes
    ```mlir
    %a, %m, %s = attn.init_state outs(%acc0, %max0, %sum0) ...
    %a1, %m1, %s1 = attn.component %q, %k, %v state(%a, %m, %s)
        #attn.component<period = 1, residue = all, segment = 0, band = [0, 7]> ...
    %a2, %m2, %s2 = attn.component %q, %k, %v state(%a1, %m1, %s1)
        #attn.component<period = 8, residue = all, segment = 0, band = [1, inf]> ...
    %o = attn.finalize state(%a2, %m2, %s2) outs(%out0) ...
    ```
    The components' memberships add up to the pattern's multiplicity, so sums
    of patterns become several components and a union never counts a pair
    twice (docs/passes/decompose.md). `attn.attention_grad` becomes
    `attn.grad_init` and one `attn.component_grad` per component, whose
    gradients add up the same way (docs/Backward.md).
  }];
  let dependentDialects = ["::mlir::tensor::TensorDialect",
                           "::mlir::arith::ArithDialect"];
  let statistics = [
    Statistic<"numComponents", "components", "Number of components emitted">
  ];
}

def AttnBufferize : Pass<"attn-bufferize", "::mlir::ModuleOp"> {
  let summary = "Turn decomposed attention functions from tensors into memrefs";
  let description = [{
    Rewrites every function whose body holds decomposed attention
    (`attn.init_state`, `attn.component`, `attn.finalize`, `tensor.empty`,
    `tensor.dim`), or a decomposed backward pass (`attn.grad_init`,
    `attn.component_grad`), to take memrefs: tensor arguments become memrefs, results
    become trailing output memrefs written in place, the state is allocated
    and freed inside the function.
  }];
  let dependentDialects = ["::mlir::memref::MemRefDialect"];
}

def AttnTile : Pass<"attn-tile"> {
  let summary = "Closed-form tile schedules for attention components";
  let description = [{
    Replaces each memref `attn.component` (and `attn.component_grad`, into
    `attn.tile_grad`s on the same schedule) by loops over batch, head, residue
    class, segment and row tile. The key-tile range of a row tile is computed
    in closed form from the band; keys wholly inside the band are updated by
    unmasked `attn.tile_update`s, only the band's edges are masked. No mask
    tensor is built and the same code serves every sequence length.
  }];
  let options = [
    Option<"qTile", "q-tile", "int64_t", "32", "Rows per tile">,
    Option<"kvTile", "kv-tile", "int64_t", "32", "Keys per tile">,
  ];
  let dependentDialects = ["::mlir::scf::SCFDialect",
                           "::mlir::arith::ArithDialect",
                           "::mlir::memref::MemRefDialect"];
  let statistics = [
    Statistic<"numTiledComponents", "tiled-components",
              "Number of components tiled">
  ];
}

def AttnFuseOnlineSoftmax : Pass<"attn-fuse-online-softmax"> {
  let summary = "Lower tile updates, state init and finalize to fused loops";
  let description = [{
    Lowers `attn.tile_update` to the online-softmax recurrence over one block
    (scores, block maximum, rescale of the running state, exponentials and the
    P.V accumulation, all in f32 registers and a stack buffer of one key tile),
    `attn.init_state` to fills and `attn.finalize` to the normalisation
    `out = acc / sum`, `lse = max + log(sum)` with empty rows giving 0 and
    -inf.
  }];
  let dependentDialects = ["::mlir::scf::SCFDialect",
                           "::mlir::arith::ArithDialect",
                           "::mlir::math::MathDialect",
                           "::mlir::memref::MemRefDialect"];
}

def AttnLowerGrad : Pass<"attn-lower-grad"> {
  let summary = "Lower the backward pass's tile gradients and init to loops";
  let description = [{
    Lowers `attn.grad_init` to `delta = rowsum(dO * O)` and zero gradients,
    and `attn.tile_grad` to, per attended pair of its block,
    `p = exp(s - lse)`, `dv += p dO`, `ds = p (dO . v - delta)`,
    `dq += scale ds k`, `dk += scale ds q` (f32, recomputing the scores as
    the forward's lowering does). See docs/Backward.md.
  }];
  let dependentDialects = ["::mlir::scf::SCFDialect",
                           "::mlir::arith::ArithDialect",
                           "::mlir::math::MathDialect",
                           "::mlir::memref::MemRefDialect"];
}

def AttnInsertRingComm : Pass<"attn-insert-ring-comm", "::mlir::ModuleOp"> {
  let summary = "Split bufferized attention across ranks with pattern-aware ring steps";
  let description = [{
    For a module with `attn.distribution = {ranks = N, layout = ..., kv = ...}`
    replaces the bufferized attention function `@f` (static, equal query and
    key lengths L) by one function `@f_rank<r>` per rank over its chunk of
    L / N rows. The schedule is decided here, from the components alone:
    at step s rank r sends to rank r + s and receives from r - s (mod N)
    only the key/value rows that some query of the receiver attends
    (`attn.ring_exchange`), and runs only the (query piece, key piece,
    component) updates that have a pair, as `attn.component` with
    `origins` (global positions). Steps with nothing to do are dropped.
    Layouts: `contiguous` (rank r holds [rC, (r+1)C)), `zigzag` (chunks r
    and 2N-1-r of size C/2: causal work balanced), `striped` (positions
    r + N a; bands, and periods that divide or are multiples of N). The online-softmax state stays in
    f32 across steps. See docs/Ring.md.
  }];
  let dependentDialects = ["::mlir::memref::MemRefDialect",
                           "::mlir::arith::ArithDialect",
                           "::mlir::func::FuncDialect"];
  let statistics = [
    Statistic<"numExchanges", "exchanges", "Number of ring exchanges emitted">,
    Statistic<"numUpdates", "updates", "Number of component updates emitted">
  ];
}

def ConvertAttnToGpu : Pass<"convert-attn-to-gpu", "::mlir::ModuleOp"> {
  let summary = "Turn decomposed attention into tensor-core GPU kernels";
  let description = [{
    Replaces every function holding decomposed attention (`attn.init_state`,
    `attn.component`..., `attn.finalize` on tensors) by a `gpu.module
    @attn_kernels` with one kernel per component (plus an `init` kernel
    when the first component covers only some rows, and with
    `always-state` a `finalize` kernel). The
    host side is the attn runtime, which reads the launch plan recorded on
    the kernels:

    - `gpu.module` attribute `attn.launch_order`: kernel names in order;
    - `gpu.func` attribute `attn.launch`: `kind` (`single`, `begin`,
      `update`, `end`, `init`, `finalize`), `block`, `shared_bytes`, and for
      components the
      `component` whose period, residue and segment fix the grid.

    A component kernel runs one thread block of 4 warps per (q-tile of 64
    gathered rows, group = (segment, residue class), batch x head). K/V
    tiles of 64 keys are double-buffered in shared memory by `cp.async`
    (gathered rows read straight from their addresses, rows outside the
    range zero-filled); S = Q.K^T and O += P.V run on `mma.sync.m16n8k16`
    with `ldmatrix` fragments, the online softmax stays in registers
    (quad shuffles for row maxima, exp2 with the scale folded in), and only
    tiles on the band's edges (or with include/exclude filters) evaluate the
    mask. A component that covers every row (`residue = all`) is the only
    one of its pattern runs as `single`: it starts from an empty state and
    writes `out` and `lse` itself; otherwise the state lives in global
    memory between the component kernels: O / sum in the input type inside
    `out` itself with each row's `lse` (no finalize pass), or f32 O, max
    and sum in buffers of their own with `always-state`.
    With `wgmma` (sm_90a) a block is two warpgroups of 64 rows each, both
    products are warpgroup MMAs, the K/V tiles arrive by TMA from two
    tensor-map kernel parameters (gathered keys through a per-period view;
    cp.async with key_ids), and at head dims above 64, 2 of every 16
    exponentials are a polynomial on the FMA pipe instead of `ex2` on the
    busier MUFU pipe.
    With `warp-specialize` (attn-compile's default for sm_90a) components
    whose rows attend many contiguous keys get a producer warpgroup for
    the loads and three consumer warpgroups that overlap the softmax with
    the MMAs.
    See docs/passes/convert-attn-to-gpu.md.
  }];
  let dependentDialects = ["::mlir::gpu::GPUDialect",
                           "::mlir::nvgpu::NVGPUDialect",
                           "::mlir::NVVM::NVVMDialect",
                           "::mlir::LLVM::LLVMDialect",
                           "::mlir::vector::VectorDialect",
                           "::mlir::scf::SCFDialect",
                           "::mlir::arith::ArithDialect",
                           "::mlir::memref::MemRefDialect"];
  let options = [
    Option<"alwaysState", "always-state", "bool", "false",
           "Keep the state in global memory (init, update..., finalize) even "
           "for a single all-rows component: ring packages continue it across "
           "steps">,
    Option<"wgmma", "wgmma", "bool", "false",
           "sm_90a: warpgroup MMA (wgmma) reading swizzled shared-memory "
           "tiles, K/V by TMA where keys are contiguous, instead of "
           "ldmatrix + mma.sync (sm_80 and later)">,
    Option<"warpSpecialize", "warp-specialize", "bool", "false",
           "With wgmma: components whose rows attend many contiguous keys "
           "get a producer warpgroup for the TMA loads and three consumer "
           "warpgroups that overlap the softmax with the MMAs (one block "
           "per SM, setmaxnreg)">
  ];
  let statistics = [
    Statistic<"numKernels", "kernels", "Number of GPU kernels emitted">
  ];
}

#endif // ATTN_TRANSFORMS_PASSES
