// Every verifier rule of the attn dialect, each with its diagnostic.
// RUN: attn-opt %s -split-input-file -verify-diagnostics

func.func @window(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{local window must be >= 1, got 0}}
  %0 = attn.attention %q, %q, %q pattern(#attn.local<window = 0>) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @rate(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{dilated rate 3 does not divide segment 2048}}
  %0 = attn.attention %q, %q, %q pattern(#attn.dilated<segment = 2048, rate = 3>) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @stride(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{strided stride must be >= 1, got 0}}
  %0 = attn.attention %q, %q, %q pattern(#attn.strided<stride = 0, local = 1>) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @empty_sum(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{sum needs at least one pattern}}
  %0 = attn.attention %q, %q, %q pattern(#attn.sum<[]>) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @not_a_pattern(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{union member 1 is not a pattern: 3 : i64}}
  %0 = attn.attention %q, %q, %q pattern(#attn.union<[#attn.causal, 3]>) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @gqa(%q: tensor<1x6x8x4xf32>, %k: tensor<1x4x8x4xf32>) {
  // expected-error @+1 {{key/value heads (4) must divide query heads (6)}}
  %0 = attn.attention %q, %k, %k pattern(#attn.causal) : tensor<1x6x8x4xf32>, tensor<1x4x8x4xf32>, tensor<1x4x8x4xf32> -> tensor<1x6x8x4xf32>
  return
}

// -----

func.func @head_dim(%q: tensor<1x1x8x4xf32>, %k: tensor<1x1x8x8xf32>) {
  // expected-error @+1 {{head dims of query (4) and key (8) differ}}
  %0 = attn.attention %q, %k, %k pattern(#attn.causal) : tensor<1x1x8x4xf32>, tensor<1x1x8x8xf32>, tensor<1x1x8x8xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @kv_len(%q: tensor<1x1x8x4xf32>, %k: tensor<1x1x8x4xf32>, %v: tensor<1x1x9x4xf32>) {
  // expected-error @+1 {{sequence lengths of key (8) and value (9) differ}}
  %0 = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x9x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @rank(%q: tensor<8x4xf32>) {
  // expected-error @+1 {{query must have rank 4 [B, H, L, D], got 'tensor<8x4xf32>'}}
  %0 = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<8x4xf32>, tensor<8x4xf32>, tensor<8x4xf32> -> tensor<8x4xf32>
  return
}

// -----

func.func @missing_lengths(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{pattern #attn.tokenized<> needs the 'lengths' operand}}
  %0 = attn.attention %q, %q, %q pattern(#attn.tokenized<>) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @extra_lengths(%q: tensor<1x1x8x4xf32>, %len: tensor<1xi32>) {
  // expected-error @+1 {{'lengths' given but pattern #attn.causal has no tokenized part}}
  %0 = attn.attention %q, %q, %q lengths(%len) pattern(#attn.causal) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1xi32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @lengths_batch(%q: tensor<2x1x8x4xf32>, %len: tensor<3xi32>) {
  // expected-error @+1 {{batch sizes of query (2) and lengths (3) differ}}
  %0 = attn.attention %q, %q, %q lengths(%len) pattern(#attn.tokenized<>) : tensor<2x1x8x4xf32>, tensor<2x1x8x4xf32>, tensor<2x1x8x4xf32>, tensor<3xi32> -> tensor<2x1x8x4xf32>
  return
}

// -----

func.func @scale(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{scale must be > 0, got -1}}
  %0 = attn.attention %q, %q, %q pattern(#attn.causal) {scale = -1.0 : f64} : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>
  return
}

// -----

func.func @lse_shape(%q: tensor<1x1x8x4xf32>) {
  // expected-error @+1 {{lse type 'tensor<1x1x4xf32>' must be [B, H, Lq]}}
  %0, %1 = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32> -> tensor<1x1x8x4xf32>, tensor<1x1x4xf32>
  return
}

// -----

func.func @component_rate(%q: memref<1x1x8x4xf32>, %m: memref<1x1x8xf32>) {
  // expected-error @+1 {{component segment 6 must be 0 or a multiple of period 4}}
  attn.component %q, %q, %q state(%q, %m, %m) #attn.component<period = 4, residue = all, segment = 6, band = [0, inf]> {scale = 1.0 : f64} : memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8xf32>, memref<1x1x8xf32>
  return
}

// -----

func.func @component_band(%q: memref<1x1x8x4xf32>, %m: memref<1x1x8xf32>) {
  // expected-error @+1 {{component band [3, 1] is empty}}
  attn.component %q, %q, %q state(%q, %m, %m) #attn.component<period = 1, residue = all, segment = 0, band = [3, 1]> {scale = 1.0 : f64} : memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8xf32>, memref<1x1x8xf32>
  return
}

// -----

func.func @mixed(%q: memref<1x1x8x4xf32>, %m: memref<1x1x8xf32>, %t: tensor<1x1x8xf32>) {
  // expected-error @+1 {{destinations must be all tensors or all memrefs}}
  attn.init_state outs(%q, %m, %t) : memref<1x1x8x4xf32>, memref<1x1x8xf32>, tensor<1x1x8xf32>
  return
}

// -----

func.func @state_type(%q: memref<1x1x8x4xf16>, %m: memref<1x1x8xf32>) {
  // expected-error @+1 {{state must be f32}}
  attn.init_state outs(%q, %m, %m) : memref<1x1x8x4xf16>, memref<1x1x8xf32>, memref<1x1x8xf32>
  return
}

// -----

func.func @filter_lengths(%q: memref<1x1x8x4xf32>, %m: memref<1x1x8xf32>) {
  // expected-error @+1 {{component reads lengths but none are given}}
  attn.component %q, %q, %q state(%q, %m, %m) #attn.component<period = 1, residue = all, segment = 0, band = [0, inf], exclude = [#attn.tokenized<>]> {scale = 1.0 : f64} : memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8xf32>, memref<1x1x8xf32>
  return
}

// -----

func.func @head_residue_divisor(%q: memref<1x1x8x4xf32>, %m: memref<1x1x8xf32>) {
  // expected-error @+1 {{component head residue (4, 0, 0) needs modulus >= 1, offset >= 0, divisor >= 1}}
  attn.component %q, %q, %q state(%q, %m, %m) #attn.component<period = 2, residue = head(4, 0, 0), segment = 0, band = [0, inf]> {scale = 1.0 : f64} : memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8xf32>, memref<1x1x8xf32>
  return
}

// -----

func.func @origins_count(%q: memref<1x1x8x4xf32>, %m: memref<1x1x8xf32>, %i: index) {
  // expected-error @+1 {{origins are (query origin, key origin) or (query origin, key origin, query position, key position, stride), got 3 values}}
  attn.component %q, %q, %q state(%q, %m, %m) origins(%i, %i, %i) #attn.component<period = 1, residue = all, segment = 0, band = [0, inf]> {scale = 1.0 : f64} : memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8x4xf32>, memref<1x1x8xf32>, memref<1x1x8xf32>
  return
}

// -----

func.func @key_bias_rows(%q: tensor<2x1x8x4xf32>, %bias: tensor<2x9xf32>) {
  // expected-error @+1 {{key counts of key (8) and key_bias (9) differ}}
  %0 = attn.attention %q, %q, %q key_bias(%bias : tensor<2x9xf32>) pattern(#attn.full) : tensor<2x1x8x4xf32>, tensor<2x1x8x4xf32>, tensor<2x1x8x4xf32> -> tensor<2x1x8x4xf32>
  return
}

// -----

func.func @key_ids_table_batch(%q: tensor<2x1x8x4xf32>, %ids: tensor<2x8xi32>) {
  // expected-error @+1 {{with key_ids, key and value are embedding tables [1, Hkv, V, D]; got key 'tensor<2x1x8x4xf32>'}}
  %0 = attn.attention %q, %q, %q key_ids(%ids : tensor<2x8xi32>) pattern(#attn.full) : tensor<2x1x8x4xf32>, tensor<2x1x8x4xf32>, tensor<2x1x8x4xf32> -> tensor<2x1x8x4xf32>
  return
}

// -----

func.func @key_ids_bias_count(%q: tensor<2x1x8x4xf32>, %t: tensor<1x1x50x4xf32>, %ids: tensor<2x8xi32>, %bias: tensor<2x9xf32>) {
  // expected-error @+1 {{key counts of key_ids (8) and key_bias (9) differ}}
  %0 = attn.attention %q, %t, %t key_bias(%bias : tensor<2x9xf32>) key_ids(%ids : tensor<2x8xi32>) pattern(#attn.full) : tensor<2x1x8x4xf32>, tensor<1x1x50x4xf32>, tensor<1x1x50x4xf32> -> tensor<2x1x8x4xf32>
  return
}

// -----

func.func @key_ids_rank(%q: tensor<2x1x8x4xf32>, %t: tensor<1x1x50x4xf32>, %ids: tensor<16xi32>) {
  // expected-error @+1 {{key_ids must have rank 2 [B, Lk], got 'tensor<16xi32>'}}
  %0 = attn.attention %q, %t, %t key_ids(%ids : tensor<16xi32>) pattern(#attn.full) : tensor<2x1x8x4xf32>, tensor<1x1x50x4xf32>, tensor<1x1x50x4xf32> -> tensor<2x1x8x4xf32>
  return
}

// -----

func.func @grad_type(%q: tensor<1x2x8x4xf32>, %k: tensor<1x1x8x4xf32>, %lse: tensor<1x2x8xf32>) {
  // expected-error @+1 {{grad_key type 'tensor<1x2x8x4xf32>' must equal the key type 'tensor<1x1x8x4xf32>'}}
  %dq, %dk, %dv = attn.attention_grad %q, %k, %k, %q, %lse, %q pattern(#attn.causal) : tensor<1x2x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x1x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8xf32>, tensor<1x2x8x4xf32> -> tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x1x8x4xf32>
  return
}

// -----

func.func @grad_lse(%q: tensor<1x2x8x4xf32>, %lse: tensor<1x2x7xf32>) {
  // expected-error @+1 {{lse type 'tensor<1x2x7xf32>' must be [B, H, Lq] of 'tensor<1x2x8x4xf32>'}}
  %dq, %dk, %dv = attn.attention_grad %q, %q, %q, %q, %lse, %q pattern(#attn.causal) : tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x7xf32>, tensor<1x2x8x4xf32> -> tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>
  return
}

// -----

func.func @grad_lengths(%q: tensor<1x2x8x4xf32>, %lse: tensor<1x2x8xf32>) {
  // expected-error @+1 {{pattern #attn.tokenized<> needs the 'lengths' operand}}
  %dq, %dk, %dv = attn.attention_grad %q, %q, %q, %q, %lse, %q pattern(#attn.tokenized<dedup = false>) : tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8xf32>, tensor<1x2x8x4xf32> -> tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>, tensor<1x2x8x4xf32>
  return
}
