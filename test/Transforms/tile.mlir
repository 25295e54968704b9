// attn-tile: closed-form loops; only the band's edges are masked, and there
// is no mask tensor (no allocation besides the state).
// RUN: attn-opt %s -attn-decompose -attn-bufferize -attn-tile="q-tile=16 kv-tile=8" -canonicalize | FileCheck %s

// CHECK-LABEL: func @local
// CHECK-COUNT-3: memref.alloc
// CHECK-NOT: memref.alloc
// The batch loop (B = 1) folds away; heads remain.
// CHECK: scf.for %[[H:.+]] = %c0 to %c2 step %c1
// CHECK: scf.for %[[Q0:.+]] = %{{.+}} to %{{.+}} step %c16
// Left edge of the band: masked.
// CHECK: scf.for
// CHECK: attn.tile_update {{.*}} rows[%[[Q0]], %{{.+}}) keys[{{.*}}) <period = 1, residue = all, segment = 0, band = [0, 31]> {masked, max_keys = 8 : i64, scale
// Interior: every row attends every key of the tile.
// CHECK: scf.for
// CHECK: attn.tile_update {{.*}} band = [0, 31]> {max_keys = 8 : i64, scale
// Right edge (the diagonal): masked.
// CHECK: scf.for
// CHECK: attn.tile_update {{.*}} {masked, max_keys = 8 : i64, scale
func.func @local(%q: tensor<1x2x?x16xf32>) -> tensor<1x2x?x16xf32> {
  %0 = attn.attention %q, %q, %q pattern(#attn.local<window = 32>) : tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<1x2x?x16xf32>
  return %0 : tensor<1x2x?x16xf32>
}

// A dilated branch iterates only its head's residue class (h mod 4), segment
// by segment.
// CHECK-LABEL: func @dilated
// CHECK: scf.for %[[H:.+]] = %c0 to %c2 step %c1
// CHECK: %[[C:.+]] = arith.remui %[[H]], %c4
// CHECK: scf.for %{{.+}} = %[[C]] to
// CHECK: arith.floordivsi
// A two-sided unbounded band has no edges: one unmasked key loop.
// CHECK: attn.tile_update {{.*}} <period = 4, residue = head, segment = 64, band = [-inf, inf]> {max_keys = 8 : i64, scale
// CHECK-NOT: attn.tile_update
func.func @dilated(%q: tensor<1x2x?x16xf32>) -> tensor<1x2x?x16xf32> {
  %0 = attn.attention %q, %q, %q pattern(#attn.dilated<segment = 64, rate = 4, head_offset = true>) : tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32>, tensor<1x2x?x16xf32> -> tensor<1x2x?x16xf32>
  return %0 : tensor<1x2x?x16xf32>
}
