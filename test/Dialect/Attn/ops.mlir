// Round trip of every pattern attribute and of the attn operations.
// RUN: attn-opt %s | attn-opt | FileCheck %s

// CHECK-LABEL: func @patterns
func.func @patterns(%q: tensor<2x8x?x64xf32>, %k: tensor<2x2x?x64xf32>, %v: tensor<2x2x?x64xf32>, %len: tensor<2xi32>) {
  // CHECK: pattern(#attn.full)
  %0 = attn.attention %q, %k, %v pattern(#attn.full) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.causal) {scale = 1.250000e-01 : f64}
  %1 = attn.attention %q, %k, %v pattern(#attn.causal) {scale = 0.125 : f64} : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.local<window = 128>)
  %2 = attn.attention %q, %k, %v pattern(#attn.local<window = 128, causal = true>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.local<window = 16, causal = false>)
  %3 = attn.attention %q, %k, %v pattern(#attn.local<window = 16, causal = false>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.strided<stride = 128, local = 64>)
  %4 = attn.attention %q, %k, %v pattern(#attn.strided<stride = 128, local = 64>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.dilated<segment = 2048, rate = 4, head_offset = true, causal = true>)
  %5 = attn.attention %q, %k, %v pattern(#attn.dilated<segment = 2048, rate = 4, head_offset = true, causal = true>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: lengths(%{{.*}}) pattern(#attn.tokenized<dedup = true>)
  %6 = attn.attention %q, %k, %v lengths(%len) pattern(#attn.tokenized<dedup = true>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2xi32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.sum<[#attn.dilated<segment = 64, rate = 1>, #attn.dilated<segment = 256, rate = 4>]>)
  %7 = attn.attention %q, %k, %v pattern(#attn.sum<[#attn.dilated<segment = 64, rate = 1>, #attn.dilated<segment = 256, rate = 4>]>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.union<[#attn.local<window = 8>, #attn.causal]>)
  %8 = attn.attention %q, %k, %v pattern(#attn.union<[#attn.local<window = 8>, #attn.causal]>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32> -> tensor<2x8x?x64xf32>
  // CHECK: pattern(#attn.intersect<[#attn.causal, #attn.tokenized<>]>)
  %9, %lse = attn.attention %q, %k, %v lengths(%len) pattern(#attn.intersect<[#attn.causal, #attn.tokenized<>]>) : tensor<2x8x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2x2x?x64xf32>, tensor<2xi32> -> tensor<2x8x?x64xf32>, tensor<2x8x?xf32>
  return
}

// CHECK-LABEL: func @bf16_static
func.func @bf16_static(%q: tensor<1x16x4096x128xbf16>, %k: tensor<1x16x4096x128xbf16>, %v: tensor<1x16x4096x128xbf16>) -> tensor<1x16x4096x128xbf16> {
  // CHECK: attn.attention {{.*}} -> tensor<1x16x4096x128xbf16>
  %0 = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x16x4096x128xbf16>, tensor<1x16x4096x128xbf16>, tensor<1x16x4096x128xbf16> -> tensor<1x16x4096x128xbf16>
  return %0 : tensor<1x16x4096x128xbf16>
}

// CHECK-LABEL: func @state_ops
func.func @state_ops(%q: memref<1x2x?x16xf32>, %k: memref<1x2x?x16xf32>, %v: memref<1x2x?x16xf32>,
                     %acc: memref<1x2x?x16xf32>, %max: memref<1x2x?xf32>, %sum: memref<1x2x?xf32>,
                     %out: memref<1x2x?x16xf32>) {
  // CHECK: attn.init_state outs(
  attn.init_state outs(%acc, %max, %sum) : memref<1x2x?x16xf32>, memref<1x2x?xf32>, memref<1x2x?xf32>
  // CHECK: attn.component {{.*}} <period = 4, residue = head, segment = 64, band = [0, inf]>
  attn.component %q, %k, %v state(%acc, %max, %sum) #attn.component<period = 4, residue = head, segment = 64, band = [0, inf]> {scale = 0.25 : f64} : memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?xf32>, memref<1x2x?xf32>
  // CHECK: attn.component {{.*}} origins(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}) <period = 2, residue = head(4, 1, 2), segment = 0, band = [0, inf]>
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %c2 = arith.constant 2 : index
  attn.component %q, %k, %v state(%acc, %max, %sum) origins(%c0, %c0, %c1, %c1, %c2) #attn.component<period = 2, residue = head(4, 1, 2), segment = 0, band = [0, inf]> {scale = 0.25 : f64} : memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?xf32>, memref<1x2x?xf32>
  // CHECK: attn.component {{.*}} <period = 4, residue = head, segment = 64
  attn.component %q, %k, %v state(%acc, %max, %sum) #attn.component<period = 4, residue = head(4, 0, 1), segment = 64, band = [0, inf]> {scale = 0.25 : f64} : memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?xf32>, memref<1x2x?xf32>
  // CHECK: band = [-inf, inf], exclude = [#attn.causal]>
  attn.component %q, %k, %v state(%acc, %max, %sum) #attn.component<period = 1, residue = all, segment = 0, band = [-inf, inf], exclude = [#attn.causal]> {scale = 0.25 : f64} : memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?xf32>, memref<1x2x?xf32>
  // CHECK: attn.finalize state(
  attn.finalize state(%acc, %max, %sum) outs(%out) : memref<1x2x?x16xf32>, memref<1x2x?xf32>, memref<1x2x?xf32>, memref<1x2x?x16xf32>
  return
}

// CHECK-LABEL: func @key_bias
func.func @key_bias(%q: tensor<2x8x5x64xf32>, %k: tensor<2x2x7x64xf32>, %bias: tensor<2x7xf32>) -> tensor<2x8x5x64xf32> {
  // CHECK: attn.attention %{{.*}}, %{{.*}}, %{{.*}} key_bias(%{{.*}} : tensor<2x7xf32>) pattern(#attn.full) :
  %0 = attn.attention %q, %k, %k key_bias(%bias : tensor<2x7xf32>) pattern(#attn.full) : tensor<2x8x5x64xf32>, tensor<2x2x7x64xf32>, tensor<2x2x7x64xf32> -> tensor<2x8x5x64xf32>
  return %0 : tensor<2x8x5x64xf32>
}

// CHECK-LABEL: func @key_ids
func.func @key_ids(%q: tensor<2x8x5x64xf32>, %t: tensor<1x2x1000x64xf32>, %ids: tensor<2x7xi32>) -> tensor<2x8x5x64xf32> {
  // CHECK: attn.attention %{{.*}}, %{{.*}}, %{{.*}} key_ids(%{{.*}} : tensor<2x7xi32>) pattern(#attn.full) :
  %0 = attn.attention %q, %t, %t key_ids(%ids : tensor<2x7xi32>) pattern(#attn.full) : tensor<2x8x5x64xf32>, tensor<1x2x1000x64xf32>, tensor<1x2x1000x64xf32> -> tensor<2x8x5x64xf32>
  return %0 : tensor<2x8x5x64xf32>
}
