// attn-insert-ring-comm rejects what it cannot split, with a location.
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-insert-ring-comm -split-input-file -verify-diagnostics

module attributes {attn.distribution = {ranks = 3 : i64, layout = "contiguous", kv = "ring"}} {
  // expected-error @+1 {{the sequence length 1000 must be a positive multiple of 3 (ranks)}}
  func.func @indivisible(%q: tensor<1x2x1000x64xf32>) -> tensor<1x2x1000x64xf32> {
    %o = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<1x2x1000x64xf32>, tensor<1x2x1000x64xf32>, tensor<1x2x1000x64xf32> -> tensor<1x2x1000x64xf32>
    return %o : tensor<1x2x1000x64xf32>
  }
}

// -----

module attributes {attn.distribution = {ranks = 2 : i64, layout = "striped", kv = "ring"}} {
  // expected-error @+1 {{layout 'striped' needs every component to map onto the ranks' strides; this pattern has period 3 that neither divides nor is a multiple of 2 ranks}}
  func.func @striped_dilated(%q: tensor<1x2x1536x64xf32>) -> tensor<1x2x1536x64xf32> {
    %o = attn.attention %q, %q, %q pattern(#attn.dilated<segment = 384, rate = 3, head_offset = true>) : tensor<1x2x1536x64xf32>, tensor<1x2x1536x64xf32>, tensor<1x2x1536x64xf32> -> tensor<1x2x1536x64xf32>
    return %o : tensor<1x2x1536x64xf32>
  }
}

// -----

// An intersection folds its dilated member's period into its components
// (attn-decompose), so the striped rule holds inside it as well.
module attributes {attn.distribution = {ranks = 2 : i64, layout = "striped", kv = "ring"}} {
  // expected-error @+1 {{layout 'striped' needs every component to map onto the ranks' strides; this pattern has period 3 that neither divides nor is a multiple of 2 ranks: use 'zigzag' or 'contiguous'}}
  func.func @striped_intersect(%q: tensor<1x2x1536x64xf32>) -> tensor<1x2x1536x64xf32> {
    %o = attn.attention %q, %q, %q pattern(#attn.intersect<[#attn.causal, #attn.dilated<segment = 384, rate = 3>]>) : tensor<1x2x1536x64xf32>, tensor<1x2x1536x64xf32>, tensor<1x2x1536x64xf32> -> tensor<1x2x1536x64xf32>
    return %o : tensor<1x2x1536x64xf32>
  }
}

// -----

module attributes {attn.distribution = {ranks = 2 : i64, layout = "zigzag", kv = "ring"}} {
  // expected-error @+1 {{ring attention needs static shapes}}
  func.func @dynamic(%q: tensor<1x2x?x64xf32>) -> tensor<1x2x?x64xf32> {
    %o = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<1x2x?x64xf32>, tensor<1x2x?x64xf32>, tensor<1x2x?x64xf32> -> tensor<1x2x?x64xf32>
    return %o : tensor<1x2x?x64xf32>
  }
}
