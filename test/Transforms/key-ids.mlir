// key_ids: k and v are embedding tables [1, Hkv, V, D] read at row
// key_ids[b, j]; the number of keys comes from the ids, not the table.
// RUN: attn-opt %s -attn-decompose | FileCheck %s --check-prefix=DECOMP
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-tile -attn-fuse-online-softmax | FileCheck %s --check-prefix=FUSED

// DECOMP-LABEL: func.func @keyed
// DECOMP: attn.component {{.*}} key_bias(%{{.*}} : tensor<2x?xf32>) key_ids(%{{.*}} : tensor<2x?xi32>) state(
// FUSED-LABEL: func.func @keyed
// The key count is the ids' second dimension.
// FUSED: memref.dim %{{.*}}, %c1{{.*}} : memref<2x?xi32>
// The score reads table row key_ids[b, j] of batch 0.
// FUSED: %[[ID:.*]] = memref.load %{{.*}}[%{{.*}}, %{{.*}}] : memref<2x?xi32>
// FUSED: %[[ROW:.*]] = arith.index_cast %[[ID]] : i32 to index
// FUSED: memref.load %{{.*}}[%c0{{.*}}, %{{.*}}, %[[ROW]], %{{.*}}] : memref<1x2x?x16xf32>
func.func @keyed(%q: tensor<2x4x?x16xf32>, %table: tensor<1x2x?x16xf32>, %bias: tensor<2x?xf32>, %ids: tensor<2x?xi32>) -> tensor<2x4x?x16xf32> {
  %0 = attn.attention %q, %table, %table key_bias(%bias : tensor<2x?xf32>) key_ids(%ids : tensor<2x?xi32>) pattern(#attn.full) : tensor<2x4x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<2x4x?x16xf32>
  return %0 : tensor<2x4x?x16xf32>
}
