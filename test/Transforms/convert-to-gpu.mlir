// RUN: attn-opt %s -split-input-file -attn-decompose -convert-attn-to-gpu -canonicalize | FileCheck %s

// One component covering every row: a single kernel, no state.
// CHECK-LABEL: module attributes {gpu.container_module}
// CHECK: gpu.module @attn_kernels attributes {attn.launch_order = ["component_0"]
// CHECK-SAME: dtype = "bf16"
// CHECK: gpu.func @component_0
// CHECK-SAME: attn.launch = {block = 128 : i64, block_rows = 64 : i64, component = #attn.component<period = 1, residue = all, segment = 0, band = [0, inf]>, kind = "single", shared_bytes = 87040 : i64}
// CHECK: gpu.dynamic_shared_memory
// CHECK: nvgpu.device_async_copy
// CHECK: nvgpu.ldmatrix {{.*}} {numTiles = 4 : i32, transpose = false}
// CHECK: scf.for
// CHECK: nvvm.mma.sync {{.*}}multiplicandAPtxType = #nvvm.mma_type<bf16>
// CHECK: gpu.shuffle  xor
// CHECK: llvm.call_intrinsic "llvm.nvvm.ex2.approx.ftz.f"
// CHECK: nvgpu.ldmatrix {{.*}} {numTiles = 4 : i32, transpose = true}
// CHECK-NOT: func.func
func.func @causal(%q: tensor<1x4x?x128xbf16>, %k: tensor<1x4x?x128xbf16>, %v: tensor<1x4x?x128xbf16>) -> (tensor<1x4x?x128xbf16>, tensor<1x4x?xf32>) {
  %o, %lse = attn.attention %q, %k, %v pattern(#attn.causal) : tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16>, tensor<1x4x?x128xbf16> -> tensor<1x4x?x128xbf16>, tensor<1x4x?xf32>
  return %o, %lse : tensor<1x4x?x128xbf16>, tensor<1x4x?xf32>
}

// -----

// Strided: a band and a per-residue causal component share a state in
// global memory; both cover every row, so the first starts the state
// (`begin`, no init kernel) and the last ends it (`end`); f16 with GQA and
// head dim 64.
// CHECK: gpu.module @attn_kernels attributes {attn.launch_order = ["component_0", "component_1"]
// CHECK: gpu.func @component_0
// CHECK-SAME: component = #attn.component<period = 1, residue = all, segment = 0, band = [0, 7]>, kind = "begin", shared_bytes = 46080
// The band's edge tiles: per row, the run of columns [lower, upper] it
// attends (an empty run as lower = 128, span 0); per element one unsigned
// compare of cc - lower against the span and one select.
// CHECK: scf.for
// CHECK: nvvm.mma.sync {{.*}} : (vector<2xf16>, vector<2xf16>, f32)
// CHECK: scf.if %{{.*}} -> (f32
// CHECK: %[[LOWER:.*]] = arith.select %[[EMPTY:.*]], %c128_i32, %{{.*}} : i32
// CHECK: %[[SPAN:.*]] = arith.select %[[EMPTY]], %c0_i32, %{{.*}} : i32
// CHECK: %[[CC:.*]] = arith.subi %c0_i32, %[[LOWER]] : i32
// CHECK: %[[IN:.*]] = arith.cmpi ule, %[[CC]], %[[SPAN]] : i32
// CHECK: arith.select %[[IN]], %{{.*}}, %cst{{.*}} : f32
// The state between them is O / sum in the 16-bit input type, kept in out
// itself (%arg4), and the rows' lse (%arg5): `begin` stores its rows through
// shared memory in 16-byte pieces, with their lse and no max or sum
// (%arg7, %arg8); `end` loads the lse and column pairs.
// CHECK: vector.store {{.*}} : memref<64x72xf16, #gpu.address_space<workgroup>>, vector<2xf16>
// CHECK-NOT: %arg7[
// CHECK: memref.store {{.*}}, %arg5[
// CHECK-NOT: %arg8[
// CHECK: vector.store {{.*}}, %arg4[{{.*}}] {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK: gpu.func @component_1
// CHECK-SAME: component = #attn.component<period = 8, residue = all, segment = 0, band = [1, inf]>, kind = "end"
// CHECK-NOT: %arg7[
// CHECK: memref.load %arg5[
// CHECK-NOT: %arg8[
// CHECK: vector.load %arg4[{{.*}}] {alignment = 4 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<2xf16>
// CHECK: arith.extf {{.*}} : vector<2xf16> to vector<2xf32>
// Out leaves through shared memory in 16-byte pieces.
// CHECK: vector.store {{.*}} {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK-NOT: gpu.func @finalize
func.func @strided(%q: tensor<2x8x?x64xf16>, %k: tensor<2x2x?x64xf16>, %v: tensor<2x2x?x64xf16>) -> tensor<2x8x?x64xf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.strided<stride = 8, local = 8>) : tensor<2x8x?x64xf16>, tensor<2x2x?x64xf16>, tensor<2x2x?x64xf16> -> tensor<2x8x?x64xf16>
  return %o : tensor<2x8x?x64xf16>
}

// -----

// A dilated component with head offsets covers only its residue's rows, so
// it updates a state that init starts. The 16-bit state (O / sum) lives in
// out: init writes out's zeros (8 elements per thread, 16-byte stores) and
// every row's empty lse (no max or sum: the lse is the rest of the state);
// the component updates its rows' out and lse; no finalize follows.
// CHECK: attn.launch_order = ["init", "component_0"]
// CHECK: gpu.func @init
// CHECK-SAME: elements_per_thread = 8 : i64, kind = "init"
// CHECK: vector.store {{.*}}, %arg4[{{.*}}] {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK-NOT: %arg7[
// CHECK: memref.store %cst{{.*}}, %arg5[
// CHECK: component = #attn.component<period = 4, residue = head, segment = 64
// CHECK: vector.load %arg4[{{.*}}] {alignment = 4 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<2xf16>
// CHECK: memref.store {{.*}}, %arg5[
// CHECK: vector.store {{.*}}, %arg4[{{.*}}] {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK-NOT: gpu.func @finalize
func.func @dilated(%q: tensor<1x4x256x128xbf16>, %k: tensor<1x4x256x128xbf16>, %v: tensor<1x4x256x128xbf16>) -> tensor<1x4x256x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.dilated<segment = 64, rate = 4, head_offset = true>) : tensor<1x4x256x128xbf16>, tensor<1x4x256x128xbf16>, tensor<1x4x256x128xbf16> -> tensor<1x4x256x128xbf16>
  return %o : tensor<1x4x256x128xbf16>
}

// -----

// LongNet: the rate-1 branch covers every row of every head and begins the
// state; the later branches cover one residue class per head, so the last
// updates it, and its rows' out and lse are then final.
// CHECK: attn.launch_order = ["component_0", "component_1", "component_2"]
// CHECK: gpu.func @component_0
// CHECK-SAME: component = #attn.component<period = 1, residue = head, segment = 64, band = [0, inf]>, kind = "begin"
// CHECK: gpu.func @component_1
// CHECK-SAME: kind = "update"
// CHECK: gpu.func @component_2
// CHECK-SAME: kind = "update"
// CHECK-NOT: gpu.func @finalize
func.func @longnet(%q: tensor<1x4x256x128xbf16>, %k: tensor<1x4x256x128xbf16>, %v: tensor<1x4x256x128xbf16>) -> tensor<1x4x256x128xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.sum<[#attn.dilated<segment = 64, rate = 1, head_offset = true, causal = true>, #attn.dilated<segment = 128, rate = 2, head_offset = true, causal = true>, #attn.dilated<segment = 256, rate = 4, head_offset = true, causal = true>]>) : tensor<1x4x256x128xbf16>, tensor<1x4x256x128xbf16>, tensor<1x4x256x128xbf16> -> tensor<1x4x256x128xbf16>
  return %o : tensor<1x4x256x128xbf16>
}

// -----

// A union's later member excludes the earlier one (local window 8 here):
// the exclusion's predicate runs only on the key tiles it can reach, so the
// mask stays a runtime branch (with `true` it would fold away) on the tile's
// position ranges: p - j < 8 for the closest pair and j <= p for some pair.
// (The later member attends keys after the row: under a causal one the
// window's exclusion would be a range of keys instead, as in
// test/Target/gpu-package.test.)
// CHECK: name = "union"
// CHECK: gpu.func @component_1
// CHECK-SAME: exclude = [#attn.local<window = 8>]
// CHECK: scf.for
// CHECK: %[[NEAR:.*]] = arith.cmpi slt, %{{.*}}, %c8
// CHECK: %[[MAY:.*]] = arith.andi %{{.*}}, %[[NEAR]]
// CHECK: %[[MASKED:.*]] = arith.ori %{{.*}}, %[[MAY]]
// CHECK: scf.if %[[MASKED]] -> (f32
// CHECK: nvvm.vote.sync any
func.func @union(%q: tensor<1x4x?x64xbf16>, %k: tensor<1x4x?x64xbf16>, %v: tensor<1x4x?x64xbf16>) -> tensor<1x4x?x64xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.union<[#attn.local<window = 8>, #attn.full]>) : tensor<1x4x?x64xbf16>, tensor<1x4x?x64xbf16>, tensor<1x4x?x64xbf16> -> tensor<1x4x?x64xbf16>
  return %o : tensor<1x4x?x64xbf16>
}

// -----

// Three components that each cover every row share the state in global
// memory: the first starts it (`begin`, no init kernel), the last ends it
// (`end`, no finalize); `end` loads the 16-bit acc's column pairs (and
// multiplies them by the sum).
// CHECK: attn.launch_order = ["component_0", "component_1", "component_2"]
// CHECK: gpu.func @component_0
// CHECK-SAME: kind = "begin"
// CHECK: vector.store {{.*}} {alignment = 16 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<8xf16>
// CHECK: gpu.func @component_1
// CHECK-SAME: kind = "update"
// CHECK: gpu.func @component_2
// CHECK-SAME: kind = "end"
// CHECK: vector.load {{.*}} {alignment = 4 : i64} : memref<?xf16, #gpu.address_space<global>>, vector<2xf16>
// CHECK: arith.extf {{.*}} : vector<2xbf16> to vector<2xf32>
// CHECK-NOT: gpu.func @finalize
func.func @three(%q: tensor<1x4x?x64xbf16>, %k: tensor<1x4x?x64xbf16>, %v: tensor<1x4x?x64xbf16>) -> tensor<1x4x?x64xbf16> {
  %o = attn.attention %q, %k, %v pattern(#attn.sum<[#attn.local<window = 8>, #attn.strided<stride = 16, local = 16>]>) : tensor<1x4x?x64xbf16>, tensor<1x4x?x64xbf16>, tensor<1x4x?x64xbf16> -> tensor<1x4x?x64xbf16>
  return %o : tensor<1x4x?x64xbf16>
}
