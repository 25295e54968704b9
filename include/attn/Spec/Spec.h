//===- Spec.h - JSON attention specs -> attn IR -----------------*- C++ -*-===//
//
// A spec names one attention layer: shapes, dtype, scale, pattern, and the
// reserved target and distribution sections (docs/SpecFormat.md). Parsing
// checks every field and reports the JSON path of the first error, e.g.
// `pattern.sum[1].dilated: dilated rate 3 does not divide segment 2048`.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_SPEC_SPEC_H
#define ATTN_SPEC_SPEC_H

#include "mlir/IR/Attributes.h"
#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/OwningOpRef.h"

#include <cstdint>
#include <optional>
#include <string>

namespace mlir::attn {

struct SpecTarget {
  std::string arch = "cpu";  ///< cpu, sm_90a or sm_80
  int64_t qTile = 32;        ///< rows per tile
  int64_t kvTile = 32;       ///< keys per tile
};

struct SpecDistribution {
  bool present = false; ///< the spec has a distribution section: a ring package
  int64_t ranks = 1;
  std::string layout = "contiguous"; ///< contiguous, zigzag or striped
  std::string kv = "ring";           ///< ring or allgather
};

struct Spec {
  std::string name;
  std::string dtype = "f32"; ///< f32, bf16 or f16
  int64_t batch = 1, heads = 1, kvHeads = 1, headDim = 64;
  std::optional<int64_t> qLen, kvLen; ///< absent = dynamic
  std::optional<double> scale;        ///< absent = 1/sqrt(head_dim)
  bool lse = true;                    ///< also return the log-sum-exp
  bool keyBias = false; ///< takes key_bias [B, kv_len] f32 added to scores
  /// takes key_ids [B, kv_len] i32: k and v are tables [1, Hkv, vocab, D]
  bool keyIds = false;
  std::optional<int64_t> vocab; ///< table rows with key_ids; absent = dynamic
  /// also compile `<name>_backward` (the CPU target's gradients)
  bool backward = false;
  Attribute pattern;
  SpecTarget target;
  SpecDistribution distribution;
  std::string json; ///< the spec as normalised JSON, for package manifests

  double effectiveScale() const;
};

/// Parses a spec; on failure returns std::nullopt and sets `error` to
/// "<json path>: <what is wrong>".
std::optional<Spec> parseSpec(const std::string &text, MLIRContext *ctx,
                              std::string &error);

/// A module holding
/// `func.func @<name>(q, k, v[, lengths][, key_bias][, key_ids]) -> (out[, lse])`
/// with one `attn.attention`, and with `backward` also
/// `func.func @<name>_backward(q, k, v, out, lse, grad_out[, lengths]
/// [, key_bias]) -> (dq, dk, dv)` with one `attn.attention_grad`.
OwningOpRef<ModuleOp> buildAttentionModule(const Spec &spec, MLIRContext *ctx);

} // namespace mlir::attn

#endif // ATTN_SPEC_SPEC_H
