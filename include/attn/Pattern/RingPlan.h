//===- RingPlan.h - compile-time schedules for ring attention ---*- C++ -*-===//
//
// Splits a sequence of Lq query rows and Lk key rows across N ranks
// (contiguous, zigzag or striped layout; each of the two split alike) and
// decides, from the pattern's components alone, for every
// (rank, step):
//   - which key rows of the rank's chunk some query of the destination rank
//     attends (only those travel; a local window sends W rows, a dilated
//     branch every r-th row),
//   - which (query piece, key piece, component) updates have any pair at all
//     (steps with nothing to send, receive or compute are dropped).
// At step s rank r sends to rank (r + s) mod N and receives from
// (r - s) mod N; step 0 is the rank's own keys. Rows are counted here; the
// runtime multiplies by batch x kv-heads x head_dim x element size x 2 (K, V).
// attn-insert-ring-comm prints the plan as IR; the package writers store it
// in manifest.json for the runtime (docs/Ring.md).
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_PATTERN_RINGPLAN_H
#define ATTN_PATTERN_RINGPLAN_H

#include "attn/Dialect/Attn/IR/AttnDialect.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mlir::attn {

/// `count` runs of `len` consecutive rows, the n-th starting at
/// `start + n * pitch` (pitch is unused when count == 1).
struct RowRun {
  int64_t start = 0, len = 0, count = 1, pitch = 0;
  int64_t rows() const { return len * count; }
};

/// A set of rows of one rank's local chunk, as runs in increasing order.
struct RowSet {
  std::vector<RowRun> runs;
  int64_t rows() const;
  bool empty() const { return runs.empty(); }
  bool operator==(const RowSet &o) const;
};

/// A contiguous slice of a rank's local rows and the global row index of its
/// first row (for the striped layout, rows are rank + N * local row and
/// `origin` is unused). Query row i sits at key position i + Lk - Lq
/// (bottom-right alignment); the updates' origins are positions.
struct RingPiece {
  int64_t offset = 0, rows = 0, origin = 0;
};

/// One component update: queries of local piece `qPiece` against keys of
/// piece `kPiece` of the source rank (its own keys at step 0, the received
/// ones otherwise) with kernel `kernel`, rows at `qOrigin + index`, keys at
/// `kOrigin + index`. Lengths and filters see global positions: row a at
/// `qPos + stride * a`, key b at `kPos + stride * b` (the origins with stride
/// 1, except under the striped layout: rank + N * index, origins 0).
struct RingUpdate {
  int64_t kernel = 0;
  int64_t qPiece = 0, kPiece = 0;
  int64_t qOrigin = 0, kOrigin = 0;
  int64_t qPos = 0, kPos = 0, stride = 1;
};

struct RingStep {
  int64_t step = 0;
  int64_t sendTo = -1, recvFrom = -1; ///< -1: nothing to send / receive
  /// Rows per kv head (one entry when every kv head needs the same rows).
  std::vector<RowSet> sendRows, recvRows;
  std::vector<RingUpdate> updates;
};

struct RankPlan {
  /// The rank's query rows (q, out, lse) and key rows (k, v): the same
  /// layout over Lq and over Lk rows.
  std::vector<RingPiece> qPieces, kvPieces;
  std::vector<RingStep> steps;
  int64_t rowsSent = 0; ///< summed over kv heads (K and V count once)
};

struct RingPlan {
  int64_t ranks = 1, kvHeads = 1;
  /// Query and key rows of the whole sequence, and of one rank.
  int64_t qLen = 0, kvLen = 0, qChunk = 0, kvChunk = 0;
  std::string layout, kv;
  /// The kernels the updates name: the pattern's components (contiguous and
  /// zigzag, run with origins) or their per-(rank, source) local forms
  /// (striped, run with origins 0).
  std::vector<ComponentAttr> kernels;
  std::vector<RankPlan> rankPlans;
};

/// Plans ring attention of `components` (heads H over kvHeads) for `qLen`
/// query rows against `kvLen` keys (cross attention when they differ).
/// Returns std::nullopt and sets `error` when the layout cannot split the
/// sequences or cannot express a component.
std::optional<RingPlan> planRing(const std::vector<ComponentAttr> &components,
                                 int64_t heads, int64_t kvHeads, int64_t qLen,
                                 int64_t kvLen, int64_t ranks,
                                 const std::string &layout,
                                 const std::string &kv, std::string &error);

} // namespace mlir::attn

#endif // ATTN_PATTERN_RINGPLAN_H
