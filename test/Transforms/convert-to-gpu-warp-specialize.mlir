// RUN: attn-opt %s -attn-decompose -convert-attn-to-gpu="wgmma=true warp-specialize=true" -canonicalize | FileCheck %s

// warp-specialize (experimental): 384 threads, one block per SM, shared
// memory for Q and 4 K/V slots (32768 + 8 x 16384 bytes, 1024 of slack, a
// "full" and an "empty" 8-byte mbarrier per slot: 164928).
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 384 : i64, block_rows = 128 : i64
// CHECK-SAME: shared_bytes = 164928
// CHECK-SAME: nvvm.minctasm = 1 : i32
// The full barriers take the producer's one arrival (with the bytes), the
// empty ones the 256 consumer threads'.
// CHECK: "mbarrier.init.shared::cta.b64 [$0], 1;"
// CHECK: "mbarrier.init.shared::cta.b64 [$0], 256;"
// CHECK: "fence.mbarrier_init.release.cluster;"
// CHECK: gpu.barrier
// The producer warpgroup gives registers up; its thread 0 loads every tile,
// after waiting for the slot's previous tile to be handed back.
// CHECK: "setmaxnreg.dec.sync.aligned.u32 40;"
// CHECK: scf.for
// CHECK: mbarrier.try_wait.parity
// CHECK: mbarrier.arrive.expect_tx
// CHECK-COUNT-4: cp.async.bulk.tensor.3d
// CHECK: } else {
// CHECK: "setmaxnreg.inc.sync.aligned.u32 232;"
// The consumers load Q and meet on named barrier 1 (256 threads), not on
// the block barrier.
// CHECK: nvgpu.device_async_copy
// CHECK: "bar.sync 1, 256;"
// Tile 0 before the loop: turn taken, S issued and committed, turn passed.
// CHECK: "bar.sync $0, 256;"
// CHECK: wgmma.mma_async.sync.aligned.m64n64k16
// CHECK: "wgmma.commit_group.sync.aligned;"
// CHECK: "bar.arrive $0, 256;"
// CHECK: "wgmma.wait_group.sync.aligned 0;"
// The loop: S(it) and P.V(it - 1) issued in one turn, S waited for alone
// (one group left in flight), the softmax, then P.V waited for and its
// slot handed back.
// CHECK: scf.for
// CHECK: "bar.sync $0, 256;"
// CHECK: wgmma.mma_async.sync.aligned.m64n64k16
// CHECK: "wgmma.commit_group.sync.aligned;"
// CHECK: wgmma.mma_async.sync.aligned.m64n128k16
// CHECK: "wgmma.commit_group.sync.aligned;"
// CHECK: "bar.arrive $0, 256;"
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
func.func @causal(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}
