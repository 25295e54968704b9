// attn-fuse-online-softmax: tile updates become the online-softmax
// recurrence (max, rescale by exp(old - new), exp, P.V), finalize divides by
// the denominator and writes -inf for empty rows.
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-tile -attn-fuse-online-softmax | FileCheck %s
// RUN: attn-opt %s -attn-cpu-pipeline | FileCheck %s --check-prefix=LLVM

// CHECK-LABEL: func @causal
// The scores buffer is allocated once, at function entry, with the key tile size.
// CHECK-NEXT: memref.alloca() : memref<32xf32>
// CHECK-NOT: attn.
// CHECK-NOT: memref.alloca
// CHECK: math.fma
// CHECK: arith.maximumf
// CHECK: math.exp
// CHECK: math.log
// CHECK: arith.constant 0xFF800000 : f32
// CHECK-NOT: attn.
// LLVM: llvm.func @causal
// LLVM: llvm.intr.exp
func.func @causal(%q: tensor<1x2x?x16xf32>) -> (tensor<1x2x?x16xf32>, tensor<1x2x?xf32>) {
  %0, %1 = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<1x2x?x16xf32>, tensor<1x2x?xf32>
  return %0, %1 : tensor<1x2x?x16xf32>, tensor<1x2x?xf32>
}
