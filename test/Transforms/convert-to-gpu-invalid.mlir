// RUN: attn-opt %s -split-input-file -attn-decompose -convert-attn-to-gpu -verify-diagnostics

// expected-error @+1 {{convert-attn-to-gpu: GPU targets take bf16 or f16 inputs, got 'f32'}}
func.func @f32(%q: tensor<1x4x?x64xf32>, %k: tensor<1x4x?x64xf32>, %v: tensor<1x4x?x64xf32>) -> tensor<1x4x?x64xf32> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x64xf32>, tensor<1x4x?x64xf32>, tensor<1x4x?x64xf32> -> tensor<1x4x?x64xf32>
  return %o : tensor<1x4x?x64xf32>
}

// -----

// expected-error @+1 {{convert-attn-to-gpu: head dim must be 64 or 128 for GPU targets, got 32}}
func.func @d32(%q: tensor<1x4x?x32xbf16>, %k: tensor<1x4x?x32xbf16>, %v: tensor<1x4x?x32xbf16>) -> tensor<1x4x?x32xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x32xbf16>, tensor<1x4x?x32xbf16>, tensor<1x4x?x32xbf16> -> tensor<1x4x?x32xbf16>
  return %o : tensor<1x4x?x32xbf16>
}
