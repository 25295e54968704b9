// A key bias reaches every component and the fused score: s = scale * q.k + bias[b, j].
// RUN: attn-opt %s -attn-decompose | FileCheck %s --check-prefix=DECOMP
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-tile -attn-fuse-online-softmax | FileCheck %s --check-prefix=FUSED

// DECOMP-LABEL: func.func @biased
// DECOMP: attn.component {{.*}} key_bias(%{{.*}} : tensor<1x?xf32>) state(
// FUSED-LABEL: func.func @biased
// FUSED: %[[B:.*]] = memref.load %{{.*}}[%{{.*}}, %{{.*}}] : memref<1x?xf32>
// FUSED: arith.addf %{{.*}}, %[[B]] : f32
func.func @biased(%q: tensor<1x2x?x16xf32>, %k: tensor<1x2x?x16xf32>, %bias: tensor<1x?xf32>) -> tensor<1x2x?x16xf32> {
  %0 = attn.attention %q, %k, %k key_bias(%bias : tensor<1x?xf32>) pattern(#attn.causal) : tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<1x2x?x16xf32>
  return %0 : tensor<1x2x?x16xf32>
}
