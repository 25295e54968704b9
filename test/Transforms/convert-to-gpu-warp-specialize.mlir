// RUN: attn-opt %s -attn-decompose -convert-attn-to-gpu="wgmma=true warp-specialize=true" -canonicalize -split-input-file | FileCheck %s

// warp-specialize: a causal component (its rows attend many keys) gets 512
// threads, one block per SM, 192 rows (three consumer warpgroups), and
// shared memory for Q and 4 K/V slots (49152 + 8 x 16384 bytes, 1024 of
// slack, a "full" and an "empty" 8-byte mbarrier per slot: 181312).
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 512 : i64, block_rows = 192 : i64
// CHECK-SAME: shared_bytes = 181312
// CHECK-SAME: nvvm.minctasm = 1 : i32
// The full barriers take the producer's one arrival (with the bytes), the
// empty ones the 384 consumer threads'.
// CHECK: "mbarrier.init.shared::cta.b64 [$0], 1;"
// CHECK: "mbarrier.init.shared::cta.b64 [$0], 384;"
// CHECK: "fence.mbarrier_init.release.cluster;"
// CHECK: gpu.barrier
// The producer warpgroup gives registers up; its thread 0 loads Q's tile
// (192 rows: 3 x 2 boxes, expected on the first slot's barrier) and every
// key tile, after waiting for the slot's previous tile to be handed back.
// CHECK: "setmaxnreg.dec.sync.aligned.u32 24;"
// CHECK: "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;", "r,r" %{{.*}}, %c49152_i32
// CHECK-COUNT-6: cp.async.bulk.tensor.4d
// CHECK: scf.for
// CHECK: mbarrier.try_wait.parity
// CHECK: mbarrier.arrive.expect_tx
// CHECK-COUNT-4: cp.async.bulk.tensor.4d
// CHECK: } else {
// CHECK: "setmaxnreg.inc.sync.aligned.u32 160;"
// The consumers (no cp.async: Q came with the first key tile) meet on
// named barrier 1 (384 threads), not on the block barrier.
// CHECK-NOT: nvgpu.device_async_copy
// CHECK: "bar.sync 1, 384;"
// Tile 0 before the loop: S issued, committed and waited for.
// CHECK: wgmma.mma_async.sync.aligned.m64n64k16
// CHECK: "wgmma.commit_group.sync.aligned;\0A\09wgmma.wait_group.sync.aligned 0;"
// The loop: S(it) and P.V(it - 1) issued, S waited for alone (one group
// left in flight), the softmax, then P.V waited for and its slot handed
// back.
// CHECK: scf.for
// CHECK: wgmma.mma_async.sync.aligned.m64n64k16
// CHECK: "wgmma.commit_group.sync.aligned;"
// CHECK: wgmma.mma_async.sync.aligned.m64n128k16
// CHECK: "wgmma.commit_group.sync.aligned;"
// CHECK: "wgmma.wait_group.sync.aligned 1;"
// CHECK: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// CHECK: "wgmma.wait_group.sync.aligned 0;"
// CHECK: "mbarrier.arrive.shared::cta.b64 _, [$0];"
// CHECK: scf.yield
// The last tile's P.V after the loop.
// CHECK: wgmma.mma_async.sync.aligned.m64n128k16
// CHECK: "wgmma.wait_group.sync.aligned 0;"
// CHECK: "mbarrier.arrive.shared::cta.b64 _, [$0];"
// No block barrier after the split.
// CHECK-NOT: gpu.barrier
// CHECK: gpu.return
func.func @causal(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}

// -----

// A local window of 1024 keys: short blocks, which stay on the
// two-blocks-per-SM kernel.
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 256 : i64, block_rows = 128 : i64
// CHECK-SAME: nvvm.minctasm = 2 : i32
// CHECK-NOT: setmaxnreg
// CHECK: gpu.return
func.func @local(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.local<window = 1024>) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}
