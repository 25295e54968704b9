// The backward pass: attn.attention_grad decomposes into grad_init and one
// component_grad per component (here strided's band and residue classes),
// bufferizes into the gradient outputs, tiles on the forward's closed-form
// schedule (only the band's edges masked) and lowers to loops.
// RUN: attn-opt %s | attn-opt | FileCheck %s --check-prefix=ROUND
// RUN: attn-opt %s -attn-decompose | FileCheck %s --check-prefix=DECOMP
// RUN: attn-opt %s -attn-decompose -attn-bufferize | FileCheck %s --check-prefix=BUF
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-tile="q-tile=16 kv-tile=8" | FileCheck %s --check-prefix=TILE
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-tile -attn-lower-grad | FileCheck %s --check-prefix=LOWER
// RUN: attn-opt %s -attn-cpu-pipeline | FileCheck %s --check-prefix=LLVM

func.func @g(%q: tensor<1x2x?x16xf32>, %k: tensor<1x1x?x16xf32>, %v: tensor<1x1x?x16xf32>,
             %o: tensor<1x2x?x16xf32>, %lse: tensor<1x2x?xf32>, %do: tensor<1x2x?x16xf32>)
    -> (tensor<1x2x?x16xf32>, tensor<1x1x?x16xf32>, tensor<1x1x?x16xf32>) {
  %dq, %dk, %dv = attn.attention_grad %q, %k, %v, %o, %lse, %do pattern(#attn.strided<stride = 8, local = 8>)
      : tensor<1x2x?x16xf32>, tensor<1x1x?x16xf32>, tensor<1x1x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?xf32>, tensor<1x2x?x16xf32>
      -> tensor<1x2x?x16xf32>, tensor<1x1x?x16xf32>, tensor<1x1x?x16xf32>
  return %dq, %dk, %dv : tensor<1x2x?x16xf32>, tensor<1x1x?x16xf32>, tensor<1x1x?x16xf32>
}

// ROUND: attn.attention_grad %{{.+}} pattern(#attn.strided<stride = 8, local = 8>)

// DECOMP: %[[INIT:.+]]:4 = attn.grad_init %arg3, %arg5 outs(
// DECOMP: %[[BAND:.+]]:3 = attn.component_grad %arg0, %arg1, %arg2, %arg5, %arg4, %[[INIT]]#0 grads(%[[INIT]]#1, %[[INIT]]#2, %[[INIT]]#3) <period = 1, residue = all, segment = 0, band = [0, 7]>
// DECOMP: %[[RES:.+]]:3 = attn.component_grad {{.+}} grads(%[[BAND]]#0, %[[BAND]]#1, %[[BAND]]#2) <period = 8, residue = all, segment = 0, band = [1, inf]>
// DECOMP: return %[[RES]]#0, %[[RES]]#1, %[[RES]]#2

// The gradients are the trailing output memrefs; only delta is allocated.
// BUF: func.func @g({{.+}}, %[[DQ:arg6]]: memref<1x2x?x16xf32>, %[[DK:arg7]]: memref<1x1x?x16xf32>, %[[DV:arg8]]: memref<1x1x?x16xf32>)
// BUF: %[[DELTA:.+]] = memref.alloc(%{{.+}}) : memref<1x2x?xf32>
// BUF-NOT: memref.alloc
// BUF: attn.grad_init %arg3, %arg5 outs(%[[DELTA]], %[[DQ]], %[[DK]], %[[DV]])
// BUF-COUNT-2: attn.component_grad {{.+}} grads(%[[DQ]], %[[DK]], %[[DV]])
// BUF: memref.dealloc %[[DELTA]]

// TILE: attn.grad_init
// TILE-NOT: attn.component_grad
// TILE: attn.tile_grad {{.+}} <period = 1, residue = all, segment = 0, band = [0, 7]> {masked, scale = 2.500000e-01 : f64}
// TILE: attn.tile_grad {{.+}} <period = 1, residue = all, segment = 0, band = [0, 7]> {scale = 2.500000e-01 : f64}
// TILE: attn.tile_grad {{.+}} <period = 8, residue = all, segment = 0, band = [1, inf]>

// Rows with lse = -inf and pairs with score -inf are skipped; P is
// recomputed as exp(s - lse).
// LOWER-NOT: attn.
// LOWER: arith.cmpf ogt
// LOWER: math.exp
// LOWER-NOT: attn.tile_grad

// LLVM: llvm.func @g(
// LLVM-NOT: attn.
