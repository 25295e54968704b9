// attn-bufferize: tensor arguments become memrefs, results become output
// arguments written in place, the state is allocated and freed.
// RUN: attn-opt %s -attn-decompose -attn-bufferize | FileCheck %s

// CHECK-LABEL: func @f
// CHECK-SAME: (%[[Q:.+]]: memref<1x2x?x16xf32>, %[[K:.+]]: memref<1x2x?x16xf32>, %[[V:.+]]: memref<1x2x?x16xf32>, %[[OUT:.+]]: memref<1x2x?x16xf32>, %[[LSE:.+]]: memref<1x2x?xf32>)
// CHECK-NOT: tensor
// CHECK: %[[ACC:.+]] = memref.alloc(%{{.+}}) : memref<1x2x?x16xf32>
// CHECK: attn.init_state outs(%[[ACC]],
// CHECK: attn.component %[[Q]], %[[K]], %[[V]] state(%[[ACC]],
// CHECK: attn.finalize state(%[[ACC]], %{{.+}}, %{{.+}}) outs(%[[OUT]], %[[LSE]])
// CHECK: memref.dealloc %[[ACC]]
// CHECK: return{{$}}
func.func @f(%q: tensor<1x2x?x16xf32>, %k: tensor<1x2x?x16xf32>, %v: tensor<1x2x?x16xf32>) -> (tensor<1x2x?x16xf32>, tensor<1x2x?xf32>) {
  %o, %l = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<1x2x?x16xf32>, tensor<1x2x?xf32>
  return %o, %l : tensor<1x2x?x16xf32>, tensor<1x2x?xf32>
}

// After CSE the state tensors share one tensor.empty; each still gets its own
// buffer.
// RUN: attn-opt %s -attn-decompose -cse -attn-bufferize | FileCheck %s --check-prefix=CSE
// CSE-LABEL: func @f
// CSE: %[[A:.+]] = memref.alloc
// CSE: %[[M:.+]] = memref.alloc
// CSE: %[[S:.+]] = memref.alloc
// CSE: attn.init_state outs(%[[A]], %[[M]], %[[S]])
