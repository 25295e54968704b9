// RUN: attn-opt %s -attn-decompose -convert-attn-to-gpu=wgmma=true -canonicalize -split-input-file | FileCheck %s

// sm_90a kernels: two warpgroups (256 threads, 128 rows) share each K/V
// tile, two blocks per SM; the tiles start at the first 1024-byte boundary
// of the dynamic shared memory (shared_bytes: a 128-row Q tile, 4 64-row K/V
// tiles of 128 bf16 columns, 1024 bytes of slack, two 8-byte mbarriers),
// and both products are warpgroup MMAs in inline PTX, fenced and waited on
// with the accumulators passed through. The kernels take K's, V's, Q's and
// out's TMA tensor maps as their last four arguments.
// CHECK: gpu.func @component_0
// CHECK-SAME: !llvm.ptr, %{{.*}}: !llvm.ptr)
// CHECK-SAME: attn.launch = {block = 256 : i64, block_rows = 128 : i64
// CHECK-SAME: kind = "single", shared_bytes = 99344
// CHECK-SAME: attn.tensor_maps = 4 : i64
// CHECK-SAME: nvvm.minctasm = 2 : i32
// CHECK-DAG: %[[CLAMP:.*]] = arith.constant -1.275000e+02 : f32
// CHECK-DAG: %[[MAGIC:.*]] = arith.constant 0x4B400000 : f32
// CHECK: memref.extract_aligned_pointer_as_index
// Thread 0 sets up one mbarrier per K/V slot and starts the first tile
// with Q's: the first barrier expects Q's bytes too (no arrival; 128 rows
// as 2 x 2 boxes), then the leader's arrival expects both key tiles'; each
// tile is D/64 = 2 TMA boxes (64 columns x 64 rows, the wgmma layout). No
// cp.async: the keys have period 1, so every map exists.
// CHECK-COUNT-2: "mbarrier.init.shared::cta.b64 [$0], 1;"
// CHECK: "fence.mbarrier_init.release.cluster;"
// CHECK: "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;", "r,r" %{{.*}}, %c32768_i32
// CHECK-COUNT-4: cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
// CHECK: mbarrier.arrive.expect_tx.shared::cta.b64 st, [$0], $1; }", "r,r" %{{.*}}, %c32768_i32
// CHECK-COUNT-4: cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
// CHECK-NOT: nvgpu.device_async_copy
// CHECK: "fence.proxy.async.shared::cta;"
// CHECK-NEXT: gpu.barrier
// One barrier per key tile: wait on the slot's mbarrier; zero V's rows
// past the last key on an edge tile; barrier; then the next tile's loads.
// CHECK: scf.for
// CHECK: scf.while
// CHECK: mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;
// CHECK: vector.store %{{.*}} : memref<8192xf16, #gpu.address_space<workgroup>>, vector<8xf16>
// CHECK: "fence.proxy.async.shared::cta;"
// CHECK: gpu.barrier
// CHECK-NOT: gpu.barrier
// CHECK: mbarrier.arrive.expect_tx
// CHECK-COUNT-4: cp.async.bulk.tensor.4d
// CHECK-NOT: nvgpu.device_async_copy
// CHECK: "wgmma.fence.sync.aligned;"
// CHECK: wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
// CHECK: "wgmma.commit_group.sync.aligned;\0A\09wgmma.wait_group.sync.aligned 0;"
// Lazy rescaling: the warp votes on whether any row's max grew by more
// than 8 (log2 units); only then is O multiplied by alpha.
// CHECK: %[[GROWS:.*]] = nvvm.vote.sync any %{{.*}}, %{{.*}} -> i1
// CHECK: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// The first two scores of each row half are exponentiated on the FMA pipe:
// clamp at -127.5, round by adding 1.5 * 2^23, a degree-3 polynomial, the
// integer part added to the exponent bits and the bits clamped at 0 (0x4B400000
// is 1.5 * 2^23); the others by ex2.
// CHECK: arith.maximumf %{{.*}}, %[[CLAMP]] : f32
// CHECK-NEXT: arith.addf %{{.*}}, %[[MAGIC]] : f32
// CHECK-COUNT-3: llvm.intr.fma
// CHECK: arith.shli %{{.*}}, %c23_i32 : i32
// CHECK-NEXT: arith.addi
// CHECK-NEXT: arith.maxsi %{{.*}}, %c0_i32 : i32
// CHECK: arith.maximumf %{{.*}}, %[[CLAMP]] : f32
// CHECK: arith.maxsi %{{.*}}, %c0_i32 : i32
// CHECK-NEXT: arith.bitcast
// CHECK-NEXT: arith.addf
// CHECK-NEXT: llvm.intr.fma
// CHECK-NEXT: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// CHECK: scf.if %[[GROWS]] -> ({{.*}}f32
// CHECK: arith.mulf
// CHECK: } else {
// CHECK: wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16
// CHECK-NOT: gpu.barrier
// CHECK: scf.yield
// After the loop: out through shared memory (Q's tile, in its swizzle),
// then thread 0's TMA stores through out's map (its fourth) of each 64-row
// part whose rows are all written, and the threads' 16-byte stores of the
// other parts.
// CHECK: gpu.barrier
// CHECK: vector.store {{.*}} : memref<16384xf16, #gpu.address_space<workgroup>>, vector<2xf16>
// CHECK: "fence.proxy.async.shared::cta;"
// CHECK-NEXT: gpu.barrier
// CHECK-COUNT-2: "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [$0, {$1, $2, $3, $4}], [$5];", "l,r,r,r,r,r" %arg32,
// CHECK: scf.if
// CHECK-COUNT-2: "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [$0, {$1, $2, $3, $4}], [$5];", "l,r,r,r,r,r" %arg32,
// CHECK: "cp.async.bulk.commit_group;"
// CHECK-NEXT: "cp.async.bulk.wait_group.read 0;"
// CHECK: vector.load {{.*}} {alignment = 16 : i64} : memref<16384xf16, #gpu.address_space<workgroup>>, vector<8xf16>
// CHECK: vector.store {{.*}} {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK-NOT: nvvm.mma.sync
// CHECK-NOT: nvgpu.ldmatrix
func.func @causal(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}

// -----

// Gathered keys (period 4: positions base + 4t): the maps view a head's
// keys as [rows / 4][4][D], and a tile is a box of one residue plane (5-D
// TMA: columns, plane, row, head, batch). When 4 does not divide the key
// rows (kLen, checked at run time; the runtime leaves the maps empty then)
// the same kernel loads by cp.async. Q's rows come through q's map (its
// third) where 4 divides q's rows too (qLen), else by cp.async as well.
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.tensor_maps = 4 : i64
// CHECK: %[[REM:.*]] = arith.remui %arg12, %c4 : index
// CHECK: %[[TMA:.*]] = arith.cmpi eq, %[[REM]], %c0 : index
// CHECK: %[[QREM:.*]] = arith.remui %arg11, %c4 : index
// CHECK: %[[QDIV:.*]] = arith.cmpi eq, %[[QREM]], %c0 : index
// CHECK: %[[TMAQ:.*]] = arith.andi %[[TMA]], %[[QDIV]] : i1
// CHECK: scf.if %[[TMA]] {
// CHECK: scf.if %[[TMAQ]] {
// CHECK: "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;", "r,r" %{{.*}}, %c32768_i32
// CHECK-COUNT-4: cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [$0], [$1, {$2, $3, $4, $5, $6}], [$7];", "r,l,r,r,r,r,r,r" %{{.*}}, %arg31,
// CHECK: mbarrier.arrive.expect_tx
// CHECK-COUNT-4: cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [$0], [$1, {$2, $3, $4, $5, $6}], [$7];
// CHECK: } else {
// CHECK: nvgpu.device_async_copy %arg1
// CHECK: %[[BYCOPY:.*]] = arith.xori %[[TMAQ]], %true : i1
// CHECK: scf.if %[[BYCOPY]] {
// CHECK: nvgpu.device_async_copy %arg0
// CHECK: scf.for
// CHECK: scf.if %[[TMA]] {
// CHECK: mbarrier.try_wait.parity
// CHECK-COUNT-4: cp.async.bulk.tensor.5d
// CHECK: } else {
// CHECK: nvgpu.device_async_wait
// CHECK: gpu.barrier
// CHECK: nvgpu.device_async_copy %arg1
func.func @dilated(%q: tensor<1x4x256x128xbf16>, %k: tensor<1x4x256x128xbf16>, %v: tensor<1x4x256x128xbf16>) -> tensor<1x4x256x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.dilated<segment = 64, rate = 4, head_offset = true>) : tensor<1x4x256x128xbf16>, tensor<1x4x256x128xbf16>, tensor<1x4x256x128xbf16> -> tensor<1x4x256x128xbf16>
  return %o : tensor<1x4x256x128xbf16>
}

// -----

// A narrow band (a 128-key window: 64 rows attend at most 191 keys, three
// key tiles) gets one-warpgroup blocks with its keys resident: 128 threads,
// 64 rows, three blocks per SM (shared_bytes: a 64-row Q tile, three K
// tiles that V reuses, 1024 bytes of slack, two mbarriers). Thread 0 loads
// Q (2 boxes) and the three K tiles (6 boxes) on one mbarrier; S is one
// commit group of 3 x 8
// wgmmas; after a barrier V's three tiles load into K's slots on the second
// mbarrier while the softmax runs; P . V is 3 x 4 wgmmas. No key loop.
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 128 : i64, block_rows = 64 : i64
// CHECK-SAME: kind = "single", shared_bytes = 66576
// CHECK-SAME: nvvm.minctasm = 3 : i32
// CHECK-COUNT-2: "mbarrier.init.shared::cta.b64 [$0], 1;"
// CHECK: "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;", "r,r" %{{.*}}, %c16384_i32
// CHECK-COUNT-2: cp.async.bulk.tensor.4d{{.*}}, %arg31,
// CHECK: mbarrier.arrive.expect_tx.shared::cta.b64 st, [$0], $1; }", "r,r" %{{.*}}, %c49152_i32
// CHECK-COUNT-6: cp.async.bulk.tensor.4d
// CHECK-NOT: scf.for
// CHECK: mbarrier.try_wait.parity
// CHECK-COUNT-24: wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
// CHECK: "wgmma.commit_group.sync.aligned;\0A\09wgmma.wait_group.sync.aligned 0;"
// CHECK: gpu.barrier
// CHECK: mbarrier.arrive.expect_tx.shared::cta.b64 st, [$0], $1; }", "r,r" %{{.*}}, %c49152_i32
// CHECK-COUNT-6: cp.async.bulk.tensor.4d
// CHECK: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// CHECK: mbarrier.try_wait.parity
// CHECK-COUNT-12: wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16
// CHECK-NOT: wgmma.mma_async
// CHECK-NOT: scf.for
// CHECK: gpu.return
func.func @narrow_local(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.local<window = 128>) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}

// -----

// A union's gathered later branch (it excludes the earlier one) runs on
// one-warpgroup blocks of 64 rows that walk their key tiles (two blocks an
// SM: the exclusion's predicates then fit the registers); the contiguous
// first branch keeps two warpgroups.
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 256 : i64, block_rows = 128 : i64
// CHECK-SAME: nvvm.minctasm = 2 : i32
// CHECK: gpu.func @component_1
// CHECK-SAME: attn.launch = {block = 128 : i64, block_rows = 64 : i64
// CHECK-SAME: exclude = [#attn.dilated<segment = 64, rate = 1
// CHECK-SAME: shared_bytes = 82960 : i64
// CHECK-SAME: nvvm.minctasm = 2 : i32
// CHECK: scf.for
func.func @union_gathered(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> tensor<1x4x?x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.union<[#attn.dilated<segment = 64, rate = 1>, #attn.dilated<segment = 256, rate = 4, head_offset = true>]>) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>
  return %o : tensor<1x4x?x128xbf16>
}

// -----

// Head dim 64: every exponential by ex2, none by the polynomial (no 1.5 *
// 2^23 among the constants): against MMAs half as long, the FMA pipe has
// no room to spare for it (bench/gpu_ab.md, "Head dim 64").
// CHECK-LABEL: name = "causal_d64"
// CHECK: gpu.func @component_0
// CHECK-SAME: block_rows = 128
// Key tiles of 128 keys at head dim 64: two 64-row boxes of K (16 KB a
// tile, 32 KB with V's), S as m64n128, P . V in 8 k-steps of m64n64.
// CHECK: expect_tx.shared::cta.b64 st, [$0], $1; }", "r,r" %{{.*}}, %c32768_i32
// CHECK-COUNT-4: cp.async.bulk.tensor.4d
// CHECK-NOT: 0x4B400000
// CHECK-COUNT-4: wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16
// CHECK: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// CHECK-COUNT-8: wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16
func.func @causal_d64(%q: tensor<1x4x?x64xbf16>, %k: tensor<1x4x?x64xbf16>, %v: tensor<1x4x?x64xbf16>) -> tensor<1x4x?x64xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x64xbf16>, tensor<1x4x?x64xbf16>, tensor<1x4x?x64xbf16> -> tensor<1x4x?x64xbf16>
  return %o : tensor<1x4x?x64xbf16>
}
