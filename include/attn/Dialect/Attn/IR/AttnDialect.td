//===- AttnDialect.td - the attn dialect -------------------*- tablegen -*-===//
//
// The attn dialect describes attention with a sparsity pattern. A pattern is an
// attribute (full, causal, local, strided, dilated, tokenized, and their sums,
// unions and intersections) that defines a multiplicity m(h, i, j) for head h,
// query row i and key row j; see docs/Semantics.md.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_DIALECT
#define ATTN_DIALECT

include "mlir/IR/OpBase.td"

def Attn_Dialect : Dialect {
  let name = "attn";
  let cppNamespace = "::mlir::attn";
  let summary = "Sparse and distributed attention";
  let description = [{
    The `attn` dialect expresses attention whose sparsity is described by a
    pattern attribute. For query row `i`, key row `j` and head `h` the pattern
    gives a multiplicity `m(h, i, j)`; with `s = scale * q_i . k_j`:

        O_i   = sum_j m exp(s_ij) v_j / sum_j m exp(s_ij)
        LSE_i = log sum_j m exp(s_ij)

    A row with no attended key gives `O_i = 0` and `LSE_i = -inf`. When the
    query and key lengths differ, positions are aligned bottom-right: query row
    `i` sits at key position `i + Lk - Lq`.

    The compiler lowers `attn.attention` into a sum of dense *components*
    (`attn.component`), each an affine re-indexing of rows and keys plus a band
    structure, that update one online-softmax state (`attn.init_state`,
    `attn.finalize`), then into closed-form tile loops (`attn.tile_update`).
  }];
  let useDefaultAttributePrinterParser = 1;
  let dependentDialects = ["::mlir::arith::ArithDialect",
                           "::mlir::scf::SCFDialect",
                           "::mlir::memref::MemRefDialect",
                           "::mlir::tensor::TensorDialect"];
}

#endif // ATTN_DIALECT
