// attn-insert-ring-comm: one function per rank; each step exchanges only the
// key/value rows the receiver attends, and steps with nothing to do vanish.
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-insert-ring-comm -split-input-file | FileCheck %s

// A causal window W = 100 over chunks of 256 rows: each rank's last W - 1 = 99
// rows (157..255) go to the next rank in one exchange; steps 2 and 3 are gone.
// CHECK-LABEL: func.func @local_rank0(%{{.*}}: memref<1x2x256x64xf32>
// CHECK-SAME: attn.layout = "contiguous", attn.rank = 0 : i64, attn.ranks = 4 : i64
// CHECK: attn.component %arg0, %arg1, %arg2 state({{.*}}) origins(%[[Z:.+]], %[[Z2:.+]]) <period = 1, residue = all, segment = 0, band = [0, 99]>
// CHECK: attn.ring_exchange %arg1, %arg2 into {{.*}} {recv_from = -1 : i64, recv_rows = [], send_rows = [array<i64: 157, 99, 1, 0>], send_to = 1 : i64, step = 1 : i64}
// CHECK-NOT: attn.ring_exchange
// CHECK: attn.finalize
// CHECK-LABEL: func.func @local_rank1
// CHECK: attn.ring_exchange {{.*}} {recv_from = 0 : i64, recv_rows = [array<i64: 157, 99, 1, 0>], send_rows = [array<i64: 157, 99, 1, 0>], send_to = 2 : i64, step = 1 : i64}
// CHECK: %[[QO:.+]] = arith.constant 256 : index
// CHECK: attn.component %arg0, %[[KB:.+]], %[[VB:.+]] state({{.*}}) origins(%[[QO]], %{{.+}}) <period = 1, residue = all, segment = 0, band = [0, 99]>
// CHECK-LABEL: func.func @local_rank2
// CHECK-LABEL: func.func @local_rank3
// CHECK: attn.ring_exchange {{.*}} {recv_from = 2 : i64, recv_rows = [array<i64: 157, 99, 1, 0>], send_rows = [], send_to = -1 : i64, step = 1 : i64}
// CHECK-NOT: func.func @local(
module attributes {attn.distribution = {ranks = 4 : i64, layout = "contiguous", kv = "ring"}} {
  func.func @local(%q: tensor<1x2x1024x64xf32>, %k: tensor<1x2x1024x64xf32>, %v: tensor<1x2x1024x64xf32>) -> tensor<1x2x1024x64xf32> {
    %o = attn.attention %q, %k, %v pattern(#attn.local<window = 100>) : tensor<1x2x1024x64xf32>, tensor<1x2x1024x64xf32>, tensor<1x2x1024x64xf32> -> tensor<1x2x1024x64xf32>
    return %o : tensor<1x2x1024x64xf32>
  }
}

// -----

// A dilated branch (segment 1024 = two chunks, rate 4, no head offset): only
// every 4th row travels (128 runs of 1 row, pitch 4), and only inside a
// segment: rank 0 sends to rank 1, rank 1 sends to nobody (rank 2 starts the
// next segment), and no step 2 or 3 exists.
// CHECK-LABEL: func.func @dilated_rank0
// CHECK: attn.ring_exchange {{.*}} {recv_from = -1 : i64, recv_rows = [], send_rows = [array<i64: 0, 1, 128, 4>], send_to = 1 : i64, step = 1 : i64}
// CHECK-NOT: attn.ring_exchange
// CHECK-LABEL: func.func @dilated_rank1
// CHECK: attn.ring_exchange {{.*}} {recv_from = 0 : i64, recv_rows = [array<i64: 0, 1, 128, 4>], send_rows = [], send_to = -1 : i64, step = 1 : i64}
// CHECK-NOT: attn.ring_exchange
// CHECK-LABEL: func.func @dilated_rank2
module attributes {attn.distribution = {ranks = 4 : i64, layout = "contiguous", kv = "ring"}} {
  func.func @dilated(%q: tensor<1x2x2048x64xf32>) -> tensor<1x2x2048x64xf32> {
    %o = attn.attention %q, %q, %q pattern(#attn.dilated<segment = 1024, rate = 4, causal = true>) : tensor<1x2x2048x64xf32>, tensor<1x2x2048x64xf32>, tensor<1x2x2048x64xf32> -> tensor<1x2x2048x64xf32>
    return %o : tensor<1x2x2048x64xf32>
  }
}

// -----

// Zigzag halves the chunk: rank 0 holds chunks 0 and 3 (origins 0 and 768),
// and under a causal mask sends only chunk 0 to rank 1.
// CHECK-LABEL: func.func @causal_rank0
// CHECK: memref.subview %arg0[0, 0, 256, 0] [1, 2, 256, 64]
// CHECK: attn.ring_exchange {{.*}} {recv_from = 1 : i64, recv_rows = [array<i64: 0, 512, 1, 0>], send_rows = [array<i64: 0, 256, 1, 0>], send_to = 1 : i64, step = 1 : i64}
module attributes {attn.distribution = {ranks = 2 : i64, layout = "zigzag", kv = "ring"}} {
  func.func @causal(%q: tensor<1x2x1024x64xf32>) -> tensor<1x2x1024x64xf32> {
    %o = attn.attention %q, %q, %q pattern(#attn.causal) : tensor<1x2x1024x64xf32>, tensor<1x2x1024x64xf32>, tensor<1x2x1024x64xf32> -> tensor<1x2x1024x64xf32>
    return %o : tensor<1x2x1024x64xf32>
  }
}

// -----

// Striped over 2 ranks, a LongNet branch of rate 4 with head offsets, within
// lengths: class c = h % 4 lives on rank c % 2, so nothing travels; each rank
// keeps the heads whose class is its own (residue head(4, r, 2)) and sees
// positions r + 2 * index for the lengths.
// CHECK-LABEL: func.func @striped_longnet_rank0
// CHECK-NOT: attn.ring_exchange
// CHECK: attn.component {{.*}} origins(%{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}, %{{.*}}) <period = 2, residue = head(4, 0, 2), segment = 16, band = [0, inf], lengths = true>
// CHECK-LABEL: func.func @striped_longnet_rank1
// CHECK-NOT: attn.ring_exchange
// CHECK: attn.component {{.*}} <period = 2, residue = head(4, 1, 2), segment = 16, band = [0, inf], lengths = true>
module attributes {attn.distribution = {ranks = 2 : i64, layout = "striped", kv = "ring"}} {
  func.func @striped_longnet(%q: tensor<1x4x64x16xf32>, %len: tensor<1xi32>) -> tensor<1x4x64x16xf32> {
    %o = attn.attention %q, %q, %q lengths(%len) pattern(#attn.intersect<[#attn.dilated<segment = 32, rate = 4, head_offset = true, causal = true>, #attn.tokenized<>]>) : tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1x4x64x16xf32>, tensor<1xi32> -> tensor<1x4x64x16xf32>
    return %o : tensor<1x4x64x16xf32>
  }
}

// -----

// Cross attention (Lq = 512, Lk = 1024) on 2 contiguous ranks: each rank holds
// 256 query rows and 512 key rows, and query row i sits at key position
// i + 512 (bottom-right), so rank 0's queries (positions 512..767) need
// rank 1's first 256 keys and rank 1's need all of rank 0's.
// CHECK-LABEL: func.func @cross_rank0(%{{.*}}: memref<1x2x256x64xf32>, %{{.*}}: memref<1x2x512x64xf32>, %{{.*}}: memref<1x2x512x64xf32>, %{{.*}}: memref<1x2x256x64xf32>)
// CHECK: %[[Q0:.+]] = arith.constant 512 : index
// CHECK: %[[K0:.+]] = arith.constant 0 : index
// CHECK: attn.component %arg0, %arg1, %arg2 state({{.*}}) origins(%[[Q0]], %[[K0]]) <period = 1, residue = all, segment = 0, band = [0, inf]>
// CHECK: attn.ring_exchange {{.*}} {recv_from = 1 : i64, recv_rows = [array<i64: 0, 256, 1, 0>], send_rows = [array<i64: 0, 512, 1, 0>], send_to = 1 : i64, step = 1 : i64}
// CHECK-LABEL: func.func @cross_rank1
// CHECK: %[[Q1:.+]] = arith.constant 768 : index
// CHECK: %[[K1:.+]] = arith.constant 512 : index
// CHECK: attn.component %arg0, %arg1, %arg2 state({{.*}}) origins(%[[Q1]], %[[K1]])
// CHECK: attn.ring_exchange {{.*}} {recv_from = 0 : i64, recv_rows = [array<i64: 0, 512, 1, 0>], send_rows = [array<i64: 0, 256, 1, 0>], send_to = 0 : i64, step = 1 : i64}
module attributes {attn.distribution = {ranks = 2 : i64, layout = "contiguous", kv = "ring"}} {
  func.func @cross(%q: tensor<1x2x512x64xf32>, %k: tensor<1x2x1024x64xf32>, %v: tensor<1x2x1024x64xf32>) -> tensor<1x2x512x64xf32> {
    %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x2x512x64xf32>, tensor<1x2x1024x64xf32>, tensor<1x2x1024x64xf32> -> tensor<1x2x512x64xf32>
    return %o : tensor<1x2x512x64xf32>
  }
}
