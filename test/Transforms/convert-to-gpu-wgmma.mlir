// RUN: attn-opt %s -attn-decompose -convert-attn-to-gpu=wgmma=true -canonicalize | FileCheck %s

// sm_90a kernels: two warpgroups (256 threads, 128 rows) share each K/V
// tile, two blocks per SM; the tiles start at the first 1024-byte boundary
// of the dynamic shared memory (shared_bytes: a 128-row Q tile, 4 64-row K/V
// tiles of 128 bf16 columns, 1024 bytes of slack), and both products are warpgroup MMAs in
// inline PTX, fenced and waited on with the accumulators passed through.
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 256 : i64, block_rows = 128 : i64
// CHECK-SAME: kind = "single", shared_bytes = 99328
// CHECK-SAME: nvvm.minctasm = 2 : i32
// CHECK: memref.extract_aligned_pointer_as_index
// CHECK: nvgpu.device_async_copy
// CHECK: "fence.proxy.async.shared::cta;"
// One barrier per key tile: wait for the tile, barrier, then the next
// tile's copies.
// CHECK: scf.for
// CHECK: nvgpu.device_async_wait
// CHECK: "fence.proxy.async.shared::cta;"
// CHECK-NEXT: gpu.barrier
// CHECK-NOT: gpu.barrier
// CHECK: nvgpu.device_async_copy
// CHECK: "wgmma.fence.sync.aligned;"
// CHECK: wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
// CHECK: "wgmma.commit_group.sync.aligned;\0A\09wgmma.wait_group.sync.aligned 0;"
// Lazy rescaling: the warp votes on whether any row's max grew by more
// than 8 (log2 units); only then is O multiplied by alpha.
// CHECK: %[[GROWS:.*]] = nvvm.vote.sync any %{{.*}}, %{{.*}} -> i1
// CHECK: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// CHECK: scf.if %[[GROWS]] -> ({{.*}}f32
// CHECK: arith.mulf
// CHECK: } else {
// CHECK: wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16
// CHECK-NOT: gpu.barrier
// CHECK: scf.yield
// After the loop: out through shared memory, then 16-byte global stores.
// CHECK: gpu.barrier
// CHECK: vector.store {{.*}} : memref<128x136xf16, #gpu.address_space<workgroup>>, vector<2xf16>
// CHECK: gpu.barrier
// CHECK: vector.load {{.*}} {alignment = 16 : i64} : memref<128x136xf16, #gpu.address_space<workgroup>>, vector<8xf16>
// CHECK: vector.store {{.*}} {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK-NOT: nvvm.mma.sync
// CHECK-NOT: nvgpu.ldmatrix
func.func @causal(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}
