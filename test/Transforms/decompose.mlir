// attn-decompose: each pattern becomes init_state, its components, finalize.
// RUN: attn-opt %s -attn-decompose -split-input-file | FileCheck %s

// CHECK-LABEL: func @causal
// CHECK: %[[DIM:.+]] = tensor.dim %[[Q:.+]], %{{.+}} : tensor<1x2x?x16xf32>
// CHECK: %[[S:.+]]:3 = attn.init_state outs(
// CHECK: %[[C:.+]]:3 = attn.component {{.*}} state(%[[S]]#0, %[[S]]#1, %[[S]]#2) <period = 1, residue = all, segment = 0, band = [0, inf]> {scale = 2.500000e-01 : f64}
// CHECK: attn.finalize state(%[[C]]#0, %[[C]]#1, %[[C]]#2)
// CHECK-NOT: attn.attention
func.func @causal(%q: tensor<1x2x?x16xf32>) -> tensor<1x2x?x16xf32> {
  %0 = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<1x2x?x16xf32>
  return %0 : tensor<1x2x?x16xf32>
}

// -----

// A causal window W is the band 0 <= i - j <= W - 1; two-sided, |i - j| <= W - 1.
// CHECK-LABEL: func @local
// CHECK: band = [0, 127]>
// CHECK: band = [-15, 15]>
func.func @local(%q: tensor<1x2x64x16xf32>) -> (tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32>) {
  %0 = attn.attention %q, %q, %q pattern(#attn.local<window = 128>) : tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32> -> tensor<1x2x64x16xf32>
  %1 = attn.attention %q, %q, %q pattern(#attn.local<window = 16, causal = false>) : tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32> -> tensor<1x2x64x16xf32>
  return %0, %1 : tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32>
}

// -----

// Strided (Child et al.): the local band, then causal attention inside each
// residue class beyond it (ceil(48 / 32) = 2 strides away at least).
// CHECK-LABEL: func @strided
// CHECK: <period = 1, residue = all, segment = 0, band = [0, 47]>
// CHECK: <period = 32, residue = all, segment = 0, band = [2, inf]>
func.func @strided(%q: tensor<1x2x64x16xf32>) -> tensor<1x2x64x16xf32> {
  %0 = attn.attention %q, %q, %q pattern(#attn.strided<stride = 32, local = 48>) : tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32> -> tensor<1x2x64x16xf32>
  return %0 : tensor<1x2x64x16xf32>
}

// -----

// Strided with local = 1 (Child et al.'s strided heads): the band would be the
// diagonal, which is the t_q = t_k pair of each residue class, so one
// per-residue component with band [0, inf] is the whole pattern.
// CHECK-LABEL: func @strided_local1
// CHECK: attn.component
// CHECK-SAME: <period = 32, residue = all, segment = 0, band = [0, inf]>
// CHECK-NOT: attn.component
// CHECK: attn.finalize
func.func @strided_local1(%q: tensor<1x2x64x16xf32>) -> tensor<1x2x64x16xf32> {
  %0 = attn.attention %q, %q, %q pattern(#attn.strided<stride = 32, local = 1>) : tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32>, tensor<1x2x64x16xf32> -> tensor<1x2x64x16xf32>
  return %0 : tensor<1x2x64x16xf32>
}

// -----

// LongNet: one gathered block-diagonal component per branch, continuing one state.
// CHECK-LABEL: func @longnet
// CHECK: <period = 1, residue = head, segment = 2048, band = [0, inf]>
// CHECK: <period = 4, residue = head, segment = 8192, band = [0, inf]>
// CHECK: <period = 16, residue = 0, segment = 32768, band = [-inf, inf]>
// CHECK: attn.finalize
func.func @longnet(%q: tensor<1x16x?x64xf32>) -> tensor<1x16x?x64xf32> {
  %0 = attn.attention %q, %q, %q pattern(#attn.sum<[
      #attn.dilated<segment = 2048, rate = 1, head_offset = true, causal = true>,
      #attn.dilated<segment = 8192, rate = 4, head_offset = true, causal = true>,
      #attn.dilated<segment = 32768, rate = 16>]>)
    : tensor<1x16x?x64xf32>, tensor<1x16x?x64xf32>, tensor<1x16x?x64xf32> -> tensor<1x16x?x64xf32>
  return %0 : tensor<1x16x?x64xf32>
}

// -----

// A union counts a pair once: later members exclude the earlier ones; an
// earlier band comes off a later band (causal after a window of 8 starts
// at 8). An intersection with tokenized clips rows and keys to the lengths.
// CHECK-LABEL: func @combinators
// CHECK: band = [0, 7]>
// CHECK: band = [8, inf]>
// CHECK: attn.component {{.*}} lengths(%{{.*}} : tensor<2xi32>) {{.*}} band = [0, inf], lengths = true>
func.func @combinators(%q: tensor<2x1x64x16xf32>, %len: tensor<2xi32>) -> (tensor<2x1x64x16xf32>, tensor<2x1x64x16xf32>) {
  %0 = attn.attention %q, %q, %q pattern(#attn.union<[#attn.local<window = 8>, #attn.causal]>) : tensor<2x1x64x16xf32>, tensor<2x1x64x16xf32>, tensor<2x1x64x16xf32> -> tensor<2x1x64x16xf32>
  %1 = attn.attention %q, %q, %q lengths(%len) pattern(#attn.intersect<[#attn.causal, #attn.tokenized<>]>) : tensor<2x1x64x16xf32>, tensor<2x1x64x16xf32>, tensor<2x1x64x16xf32>, tensor<2xi32> -> tensor<2x1x64x16xf32>
  return %0, %1 : tensor<2x1x64x16xf32>, tensor<2x1x64x16xf32>
}

// -----

// An intersection folds members that are one closed-form component into the
// geometry: a symmetric window of 21 within a dilated branch of rate 2 is
// the band |t_q - t_k| <= 10 of its groups, and a window of 50 narrows
// strided's band and classes (p - j in [16, 48]: t_q - t_k in [1, 3]).
// Where the narrowed band would be empty the member stays a filter.
// CHECK-LABEL: func @intersections
// CHECK: period = 2, residue = head, segment = 64, band = [-10, 10]>
// CHECK: period = 1, residue = all, segment = 0, band = [0, 3]>
// CHECK: period = 16, residue = all, segment = 0, band = [1, 3]>
// CHECK: period = 16, residue = all, segment = 0, band = [1, inf], include = [#attn.local<window = 10>]>
func.func @intersections(%q: tensor<1x4x64x16xf32>) -> (tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>) {
  %0 = attn.attention %q, %q, %q pattern(#attn.intersect<[#attn.local<window = 21, causal = false>, #attn.dilated<segment = 64, rate = 2, head_offset = true>]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  %1 = attn.attention %q, %q, %q pattern(#attn.intersect<[#attn.local<window = 50>, #attn.strided<stride = 16, local = 4>]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  %2 = attn.attention %q, %q, %q pattern(#attn.intersect<[#attn.local<window = 10>, #attn.strided<stride = 16, local = 4>]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  return %0, %1, %2 : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>
}

// -----

// Where an earlier band would cut a hole in a later one (a causal window
// out of a full band), it stays an exclusion; a later band that the earlier
// one covers is dropped. The plain bands go first (a union is the same in
// any order): the dilated branch after them loses causal's pairs, and what
// is left, [-inf, -1] in its groups, misses the window, which would have cut
// a hole in its whole band.
// CHECK-LABEL: func @unionExclusions
// CHECK: band = [0, 7]>
// CHECK: band = [-inf, inf], exclude = [#attn.local<window = 8>]>
// CHECK: period = 1, residue = all, segment = 0, band = [0, 7]>
// CHECK-NEXT: period = 1, residue = all, segment = 0, band = [8, inf]>
// CHECK-NEXT: period = 4, residue = 0, segment = 32, band = [-inf, -1]>
// CHECK-NOT: attn.component
// CHECK: attn.finalize
func.func @unionExclusions(%q: tensor<1x4x64x16xf32>) -> (tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>) {
  %0 = attn.attention %q, %q, %q pattern(#attn.union<[#attn.local<window = 8>, #attn.full]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  %1 = attn.attention %q, %q, %q pattern(#attn.union<[#attn.dilated<segment = 32, rate = 4>, #attn.local<window = 8>, #attn.causal, #attn.local<window = 4>]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  return %0, %1 : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>
}

// -----

// A sum inside a set combinator counts each of its pairs once, as the
// union of its members would, and a union takes the members of a sum or
// union member as its own: closed forms (the dilated branch after the
// window starts at t_q - t_k = 4 in its period-2 groups, and strided's
// classes at 1), not a full band filtered by the sum.
// CHECK-LABEL: func @sumInsideSets
// CHECK: period = 1, residue = all, segment = 0, band = [0, 7]>
// CHECK-NEXT: period = 2, residue = 0, segment = 32, band = [4, inf]>
// CHECK-NEXT: period = 16, residue = all, segment = 0, band = [1, inf], exclude = [#attn.dilated<segment = 32, rate = 2, causal = true>]>
// CHECK: attn.finalize
// CHECK: period = 1, residue = all, segment = 0, band = [0, 7]>
// CHECK-NEXT: period = 2, residue = 0, segment = 32, band = [4, inf]>
// CHECK-NOT: include
// CHECK: attn.finalize
func.func @sumInsideSets(%q: tensor<1x4x64x16xf32>) -> (tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>) {
  %0 = attn.attention %q, %q, %q pattern(#attn.union<[#attn.sum<[#attn.local<window = 8>, #attn.dilated<segment = 32, rate = 2, causal = true>]>, #attn.strided<stride = 16, local = 1>]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  %1 = attn.attention %q, %q, %q pattern(#attn.intersect<[#attn.sum<[#attn.local<window = 8>, #attn.dilated<segment = 32, rate = 2, causal = true>]>, #attn.causal]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32> -> tensor<1x4x64x16xf32>
  return %0, %1 : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>
}
