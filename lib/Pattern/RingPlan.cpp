//===- RingPlan.cpp - compile-time schedules for ring attention -----------===//
//
// For contiguous and zigzag layouts every rank holds one or two contiguous
// pieces of the query rows and as many of the keys (the same layout over Lq
// and over Lk rows; query row i sits at key position i + Lk - Lq), and a
// component restricted to a query piece
// [qs, qe) and a key piece [ks, ke) is still a set of groups (segment s,
// residue c) with positions base + period * t. In a group, the rows of the
// piece are t in [tq0, tq1), the keys t in [tk0, tk1), and a key t_k is
// attended by some row iff some t_q in [tq0, tq1) has lo <= t_q - t_k <= hi:
//
//     t_k in [max(tk0, tq0 - hi), min(tk1, tq1 - lo))
//
// so the rows to send are runs of stride `period`, found without looking at
// a single pair. The striped layout (rank r holds positions r + N * a) maps
// each component onto local indices per (query rank, key rank): see
// stripedLocal below and docs/Ring.md.
//
//===----------------------------------------------------------------------===//

#include "attn/Pattern/RingPlan.h"
#include "attn/Pattern/Pattern.h"

#include <algorithm>
#include <map>

using namespace mlir;
using namespace mlir::attn;

namespace {
constexpr int64_t kNegInf = ComponentAttr::kNegInf;
constexpr int64_t kPosInf = ComponentAttr::kPosInf;

/// The key rows of one source rank that the queries of one destination rank
/// attend, as a bitmap over the source's local rows.
using RowBitmap = std::vector<uint8_t>;

RowSet toRowSet(const RowBitmap &bits) {
  RowSet set;
  const int64_t n = static_cast<int64_t>(bits.size());
  for (int64_t i = 0; i < n;) {
    if (!bits[i]) {
      ++i;
      continue;
    }
    int64_t e = i;
    while (e < n && bits[e])
      ++e;
    RowRun run{i, e - i, 1, 0};
    // Equal runs at a constant pitch become one strided run.
    if (!set.runs.empty()) {
      RowRun &last = set.runs.back();
      int64_t lastStart = last.start + (last.count - 1) * last.pitch;
      if (last.len == run.len &&
          (last.count == 1 || run.start - lastStart == last.pitch)) {
        if (last.count == 1)
          last.pitch = run.start - last.start;
        ++last.count;
        i = e;
        continue;
      }
    }
    set.runs.push_back(run);
    i = e;
  }
  return set;
}

/// A slice of positions [begin, end) held at local rows offset + (p - begin).
struct Span {
  int64_t begin, end, offset;
};

/// Marks in `bits` the keys of `keys` that some row of `rows` attends in
/// `comp` for head `head`; returns whether any pair exists.
bool markAttendedKeys(ComponentAttr comp, int64_t head, Span rows, Span keys,
                      RowBitmap *bits) {
  const int64_t p = comp.getPeriod(), w = comp.getSegment();
  const int64_t lo = comp.getBandLo(), hi = comp.getBandHi();
  int64_t cLo = 0, cHi = p;
  if (comp.getResidue() != ComponentAttr::kAllResidues) {
    cLo = comp.classOfHead(head);
    if (cLo < 0)
      return false;
    cHi = cLo + 1;
  }
  // Segments that meet both the rows and the keys.
  int64_t sLo = 0, sHi = 1;
  if (w > 0) {
    sLo = std::max(floorDiv(rows.begin, w), floorDiv(keys.begin, w));
    sHi = std::min(floorDiv(rows.end - 1, w), floorDiv(keys.end - 1, w)) + 1;
  }
  bool any = false;
  for (int64_t s = sLo; s < sHi; ++s) {
    int64_t segLo = w > 0 ? s * w : rows.begin < keys.begin ? rows.begin
                                                             : keys.begin;
    int64_t segHi = w > 0 ? segLo + w : std::max(rows.end, keys.end);
    int64_t rb = std::max(rows.begin, segLo), re = std::min(rows.end, segHi);
    int64_t kb = std::max(keys.begin, segLo), ke = std::min(keys.end, segHi);
    if (rb >= re || kb >= ke)
      continue;
    for (int64_t c = cLo; c < cHi; ++c) {
      int64_t base = (w > 0 ? segLo : 0) + c;
      int64_t tq0 = ceilDiv(rb - base, p), tq1 = ceilDiv(re - base, p);
      int64_t tk0 = ceilDiv(kb - base, p), tk1 = ceilDiv(ke - base, p);
      if (tq0 >= tq1 || tk0 >= tk1)
        continue;
      int64_t first = hi == kPosInf ? tk0 : std::max(tk0, tq0 - hi);
      int64_t last = lo == kNegInf ? tk1 : std::min(tk1, tq1 - lo);
      if (first >= last)
        continue;
      any = true;
      if (!bits)
        return true;
      for (int64_t t = first; t < last; ++t)
        (*bits)[base + p * t - keys.begin + keys.offset] = 1;
    }
  }
  return any;
}

/// Marks in `bits` the keys `markGeometry` marks for `comp` that each of
/// its include filters reaches too, a filter reaching the keys that
/// `markPart` marks for its components; returns whether any key is marked.
bool markWithinFilters(
    ComponentAttr comp, RowBitmap &bits,
    function_ref<bool(RowBitmap &)> markGeometry,
    function_ref<void(ComponentAttr, RowBitmap &)> markPart) {
  if (comp.getInclude().empty())
    return markGeometry(bits);
  RowBitmap reach(bits.size(), 0);
  if (!markGeometry(reach))
    return false;
  for (Attribute filter : comp.getInclude()) {
    RowBitmap filterReach(bits.size(), 0);
    for (ComponentAttr part : decompose(filter))
      markPart(part, filterReach);
    for (size_t i = 0; i < reach.size(); ++i)
      reach[i] &= filterReach[i];
  }
  bool any = false;
  for (size_t i = 0; i < reach.size(); ++i)
    if (reach[i]) {
      bits[i] = 1;
      any = true;
    }
  return any;
}

/// markAttendedKeys within the reach of `comp`'s include filters: the keys
/// its geometry attends that every filter reaches too, a filter reaching
/// the keys its own components attend (exclusions, here and in the
/// filters, are left out: they only remove pairs). A component filtered by
/// a causal pattern then sends no key to an earlier rank. The filters may
/// reach a key from another row than the geometry does, so this is still a
/// superset of the keys some row attends, but never a subset: no rank
/// misses a row it needs.
bool markFilteredKeys(ComponentAttr comp, int64_t head, Span rows, Span keys,
                      RowBitmap &bits) {
  return markWithinFilters(
      comp, bits,
      [&](RowBitmap &set) {
        return markAttendedKeys(comp, head, rows, keys, &set);
      },
      [&](ComponentAttr part, RowBitmap &set) {
        markFilteredKeys(part, head, rows, keys, set);
      });
}

std::vector<RingPiece> piecesOf(const std::string &layout, int64_t ranks,
                                int64_t chunk, int64_t rank) {
  if (layout == "zigzag") {
    int64_t half = chunk / 2;
    return {{0, half, rank * half}, {half, half, (2 * ranks - 1 - rank) * half}};
  }
  if (layout == "striped")
    return {{0, chunk, 0}};
  return {{0, chunk, rank * chunk}};
}

/// Why `comp` has no local form under the striped layout of `ranks` ranks,
/// or "" when it has one.
std::string stripedUnsupported(ComponentAttr c, int64_t ranks) {
  const int64_t p = c.getPeriod(), w = c.getSegment();
  if (p % ranks != 0 && ranks % p != 0)
    return "period " + std::to_string(p) + " that neither divides nor is a "
           "multiple of " + std::to_string(ranks) + " ranks";
  if (w % ranks != 0)
    return "segment " + std::to_string(w) + " that is not a multiple of " +
           std::to_string(ranks) + " ranks";
  return "";
}

/// The local form of `comp` between striped query rank `rq` and key rank
/// `rk` (positions r + N * a), or null when no pair exists there. Segments
/// become w / N. When N divides the period P, rows and keys of a class c
/// share a rank (c = r mod N): only rq == rk has pairs, with period P / N,
/// class (c - r) / N and the same band. When P divides N, every row of rank
/// r is in class r mod P: pairs need rq = rk (mod P), and with
/// delta = (rq - rk) / P the band lo <= delta + (N / P)(a - b) <= hi is a
/// period-1 band on a - b. A head residue c(h) = (h % M - o) / d becomes
/// (h % M - o - d * r) / (d * N) in the first case (the heads whose class
/// lies on rank r) and, in the second, the class-0-only residue
/// (h % M - o - d * (r mod P)) / d of period 1 (the heads whose class is
/// r mod P). Lengths and filters keep global positions: the kernels see
/// local row a at position r + N * a (RingUpdate::stride).
ComponentAttr stripedLocal(ComponentAttr comp, int64_t ranks, int64_t rq,
                           int64_t rk) {
  const int64_t p = comp.getPeriod(), lo = comp.getBandLo(),
                hi = comp.getBandHi();
  const int64_t w = comp.getSegment() / ranks;
  int64_t res = comp.getResidue();
  const bool head = res == ComponentAttr::kHeadResidue;
  const int64_t hm = comp.getHeadMod(), ho = comp.getHeadOffset(),
                hd = comp.getHeadDiv();
  MLIRContext *ctx = comp.getContext();
  auto build = [&](int64_t period, int64_t residue, int64_t blo, int64_t bhi,
                   int64_t offset, int64_t div) {
    return ComponentAttr::get(ctx, period, residue, w, blo, bhi,
                              comp.getUseLengths(), comp.getInclude(),
                              comp.getExclude(), head ? hm : 0,
                              head ? offset : 0, head ? div : 1);
  };
  if (p % ranks == 0) {
    if (rq != rk)
      return {};
    if (res >= 0) {
      if (floorMod(res - rq, ranks) != 0)
        return {};
      res = (res - rq) / ranks;
    }
    return build(p / ranks, res, lo, hi, ho + hd * rq, hd * ranks);
  }
  // p divides ranks.
  if (floorMod(rq - rk, p) != 0 || (res >= 0 && floorMod(rq, p) != res))
    return {};
  const int64_t delta = (rq - rk) / p, step = ranks / p;
  int64_t nlo = lo == kNegInf ? kNegInf : ceilDiv(lo - delta, step);
  int64_t nhi = hi == kPosInf ? kPosInf : floorDiv(hi - delta, step);
  if (nlo != kNegInf && nhi != kPosInf && nlo > nhi)
    return {};
  return build(1, head ? res : ComponentAttr::kAllResidues, nlo, nhi,
               ho + hd * floorMod(rq, p), hd);
}

/// Under the striped layout, marks the keys of key rank `rk` (local key b
/// at position rk + N * b) that some row of query rank `rq` attends in
/// `part`, `rows` being the rank's local rows (local row a at position
/// rq + N * a + shift, rows.begin = shift / N); for components with no
/// local form. `part`'s own filters are left out (a superset). A row x
/// attends key j where x is in j's segment and class, p * lo <= x - j <=
/// p * hi: the candidates step by the period p, and x mod N repeats within
/// N of them, so at most N are tried per key.
void markStripedReach(ComponentAttr part, int64_t head, int64_t ranks,
                      int64_t rq, int64_t rk, Span rows, RowBitmap &bits) {
  const int64_t p = part.getPeriod(), w = part.getSegment();
  const int64_t lo = part.getBandLo(), hi = part.getBandHi();
  int64_t cls = -1;
  if (part.getResidue() != ComponentAttr::kAllResidues) {
    cls = part.classOfHead(head);
    if (cls < 0)
      return;
  }
  const int64_t rowsLo = rq + ranks * rows.begin;
  const int64_t rowsHi = rowsLo + ranks * (rows.end - rows.begin - 1);
  for (size_t b = 0; b < bits.size(); ++b) {
    const int64_t j = rk + ranks * static_cast<int64_t>(b);
    const int64_t segLo = w > 0 ? floorDiv(j, w) * w : 0;
    if (bits[b] || (cls >= 0 && floorMod(j - segLo, p) != cls))
      continue;
    int64_t xlo = rowsLo, xhi = rowsHi;
    if (w > 0) {
      xlo = std::max(xlo, segLo);
      xhi = std::min(xhi, segLo + w - 1);
    }
    if (lo != kNegInf)
      xlo = std::max(xlo, j + p * lo);
    if (hi != kPosInf)
      xhi = std::min(xhi, j + p * hi);
    int64_t x = xlo + floorMod(j - xlo, p);
    for (int64_t n = 0; n < ranks && x <= xhi; ++n, x += p)
      if (floorMod(x - rowsLo, ranks) == 0) {
        bits[b] = 1;
        break;
      }
  }
}

/// markFilteredKeys under the striped layout: the keys of key rank `rk`
/// that `local`, `comp`'s local form between query rank `rq` and `rk`,
/// attends (in local rows and keys), bounded by each include filter as
/// there: a filter's components reach keys through their own local forms,
/// or, where they have none (a period or segment that does not map onto
/// the ranks), through markStripedReach.
bool markStripedKeys(ComponentAttr comp, ComponentAttr local, int64_t ranks,
                     int64_t rq, int64_t rk, int64_t head, Span rows, Span keys,
                     RowBitmap &bits) {
  return markWithinFilters(
      comp, bits,
      [&](RowBitmap &set) {
        return markAttendedKeys(local, head, rows, keys, &set);
      },
      [&](ComponentAttr part, RowBitmap &set) {
        if (!stripedUnsupported(part, ranks).empty())
          markStripedReach(part, head, ranks, rq, rk, rows, set);
        else if (ComponentAttr partLocal = stripedLocal(part, ranks, rq, rk))
          markStripedKeys(part, partLocal, ranks, rq, rk, head, rows, keys,
                          set);
      });
}
} // namespace

int64_t RowSet::rows() const {
  int64_t n = 0;
  for (const RowRun &r : runs)
    n += r.rows();
  return n;
}

bool RowSet::operator==(const RowSet &o) const {
  if (runs.size() != o.runs.size())
    return false;
  for (size_t i = 0; i < runs.size(); ++i) {
    const RowRun &a = runs[i], &b = o.runs[i];
    if (a.start != b.start || a.len != b.len || a.count != b.count ||
        (a.count > 1 && a.pitch != b.pitch))
      return false;
  }
  return true;
}

std::optional<RingPlan>
mlir::attn::planRing(const std::vector<ComponentAttr> &components,
                     int64_t heads, int64_t kvHeads, int64_t qLen,
                     int64_t kvLen, int64_t ranks, const std::string &layout,
                     const std::string &kv, std::string &error) {
  const int64_t parts = layout == "zigzag" ? 2 * ranks : ranks;
  const std::string partsWhy =
      layout == "zigzag" ? " (2 x ranks chunks for the zigzag layout)"
                         : " (ranks)";
  const bool cross = qLen != kvLen;
  for (auto [name, len] : {std::pair<const char *, int64_t>{"query", qLen},
                           {"key", kvLen}})
    if (len <= 0 || len % parts != 0) {
      error = std::string("the ") + (cross ? name : "sequence") + " length " +
              std::to_string(len) +
              " must be a positive multiple of " + std::to_string(parts) +
              partsWhy;
      return std::nullopt;
    }
  const bool striped = layout == "striped";
  // Query row i sits at key position i + shift (bottom-right alignment).
  const int64_t shift = kvLen - qLen;
  if (striped) {
    for (ComponentAttr c : components) {
      std::string why = stripedUnsupported(c, ranks);
      if (!why.empty()) {
        error = "layout 'striped' needs every component to map onto the "
                "ranks' strides; this pattern has " + why +
                ": use 'zigzag' or 'contiguous'";
        return std::nullopt;
      }
    }
  }

  RingPlan plan;
  plan.ranks = ranks;
  plan.qLen = qLen;
  plan.kvLen = kvLen;
  plan.qChunk = qLen / ranks;
  plan.kvChunk = kvLen / ranks;
  plan.kvHeads = kvHeads;
  plan.layout = layout;
  plan.kv = kv;
  if (!striped)
    plan.kernels = components;
  std::map<const void *, int64_t> stripedKernels;
  auto kernelIndex = [&](ComponentAttr c) {
    auto [it, inserted] = stripedKernels.try_emplace(
        c.getAsOpaquePointer(), static_cast<int64_t>(plan.kernels.size()));
    if (inserted)
      plan.kernels.push_back(c);
    return it->second;
  };

  // Only a residue that follows the head makes kv heads need different rows.
  bool perHead = llvm::any_of(components, [](ComponentAttr c) {
    return c.getResidue() == ComponentAttr::kHeadResidue;
  });
  const int64_t rowSets = perHead ? kvHeads : 1;
  const int64_t group = heads / kvHeads;
  // Marks the keys `comp` needs for each head into its kv head's set (one
  // shared set where no residue follows the head); `mark` marks one head's.
  // Where the geometry does not follow the head, one head's keys are every
  // head's, unless a filter may follow it (a dilated branch with head
  // offsets): then every head's go into the shared set.
  auto markHeads = [&](ComponentAttr comp, std::vector<RowBitmap> &bits,
                       function_ref<bool(int64_t, RowBitmap &)> mark) {
    const bool everyHead = perHead || !comp.getInclude().empty();
    bool any = false;
    for (int64_t h = 0; h < heads; ++h) {
      any |= mark(h, bits[perHead ? h / group : 0]);
      if (!everyHead)
        break;
    }
    return any;
  };

  // needs[rq][rk][g]: rows of rank rk that rank rq attends; updates likewise.
  std::vector<std::vector<std::vector<RowSet>>> needs(
      ranks, std::vector<std::vector<RowSet>>(ranks));
  std::vector<std::vector<std::vector<RingUpdate>>> updates(
      ranks, std::vector<std::vector<RingUpdate>>(ranks));
  for (int64_t rq = 0; rq < ranks; ++rq) {
    std::vector<RingPiece> qPieces = piecesOf(layout, ranks, plan.qChunk, rq);
    for (int64_t rk = 0; rk < ranks; ++rk) {
      std::vector<RingPiece> kPieces =
          piecesOf(layout, ranks, plan.kvChunk, rk);
      std::vector<RowBitmap> bits(rowSets, RowBitmap(plan.kvChunk, 0));
      if (striped) {
        for (ComponentAttr c : components) {
          ComponentAttr local = stripedLocal(c, ranks, rq, rk);
          if (!local)
            continue;
          // Local row a of query rank rq is position rq + N * a + shift:
          // local position a + shift / N (N divides both lengths, so the
          // shift too).
          const int64_t qOrigin = shift / ranks;
          Span rows{qOrigin, qOrigin + plan.qChunk, 0},
              keys{0, plan.kvChunk, 0};
          if (markHeads(c, bits, [&](int64_t h, RowBitmap &set) {
                return markStripedKeys(c, local, ranks, rq, rk, h, rows, keys,
                                       set);
              }))
            updates[rq][rk].push_back({kernelIndex(local), 0, 0, qOrigin, 0,
                                       rq + shift, rk, ranks});
        }
      } else {
        for (size_t ci = 0; ci < components.size(); ++ci) {
          for (size_t qp = 0; qp < qPieces.size(); ++qp) {
            for (size_t kp = 0; kp < kPieces.size(); ++kp) {
              const RingPiece &a = qPieces[qp], &b = kPieces[kp];
              const int64_t qAt = a.origin + shift; // the rows' positions
              Span rows{qAt, qAt + a.rows, a.offset};
              Span keys{b.origin, b.origin + b.rows, b.offset};
              ComponentAttr c = components[ci];
              if (markHeads(c, bits, [&](int64_t h, RowBitmap &set) {
                    return markFilteredKeys(c, h, rows, keys, set);
                  }))
                updates[rq][rk].push_back(
                    {static_cast<int64_t>(ci), static_cast<int64_t>(qp),
                     static_cast<int64_t>(kp), qAt, b.origin, qAt, b.origin,
                     1});
            }
          }
        }
      }
      for (const RowBitmap &b : bits)
        needs[rq][rk].push_back(toRowSet(b));
      // One entry when every kv head needs the same rows.
      auto &sets = needs[rq][rk];
      if (sets.size() > 1 &&
          std::all_of(sets.begin(), sets.end(),
                      [&](const RowSet &s) { return s == sets[0]; }))
        sets.resize(1);
    }
  }

  auto rowsOf = [&](const std::vector<RowSet> &sets) {
    int64_t n = 0;
    for (const RowSet &s : sets)
      n += s.rows();
    return sets.size() == 1 ? n * kvHeads : n;
  };
  auto isEmpty = [](const std::vector<RowSet> &sets) {
    return std::all_of(sets.begin(), sets.end(),
                       [](const RowSet &s) { return s.empty(); });
  };
  for (int64_t r = 0; r < ranks; ++r) {
    RankPlan rank;
    rank.qPieces = piecesOf(layout, ranks, plan.qChunk, r);
    rank.kvPieces = piecesOf(layout, ranks, plan.kvChunk, r);
    for (int64_t s = 0; s < ranks; ++s) {
      int64_t dst = (r + s) % ranks, src = (r - s + ranks) % ranks;
      RingStep step;
      step.step = s;
      if (s > 0) {
        if (!isEmpty(needs[dst][r])) {
          step.sendTo = dst;
          step.sendRows = needs[dst][r];
          rank.rowsSent += rowsOf(step.sendRows);
        }
        if (!isEmpty(needs[r][src])) {
          step.recvFrom = src;
          step.recvRows = needs[r][src];
        }
      }
      step.updates = updates[r][src];
      if (step.sendTo < 0 && step.recvFrom < 0 && step.updates.empty())
        continue;
      rank.steps.push_back(std::move(step));
    }
    plan.rankPlans.push_back(std::move(rank));
  }
  return plan;
}
