//===- Pattern.cpp - evaluate and decompose attention patterns ------------===//
//
// Three views of one semantics (docs/Semantics.md):
//  - multiplicity(): m(h, i, j) straight from the definitions (the oracle);
//  - decompose(): the dense components whose memberships sum to m;
//  - buildPatternPredicate(): m > 0 as arith IR, for the masks of edge tiles;
//  - buildPatternMayHitTile(): a conservative "may m > 0 anywhere in this
//    tile" as arith IR, so that filters mask only the tiles they can reach.
// Every pattern aligns query rows to key positions bottom-right: query row i
// sits at position p = i + Lk - Lq.
//
//===----------------------------------------------------------------------===//

#include "attn/Pattern/Pattern.h"
#include "attn/Utils/IndexMath.h"

#include "mlir/Dialect/Arith/IR/Arith.h"
#include "llvm/ADT/TypeSwitch.h"

#include <optional>

using namespace mlir;
using namespace mlir::attn;

//===----------------------------------------------------------------------===//
// Plain evaluation
//===----------------------------------------------------------------------===//

int64_t mlir::attn::multiplicity(Attribute pattern, const PairPosition &pos) {
  const int64_t p = pos.row + pos.kLen - pos.qLen; // aligned query position
  const int64_t j = pos.key;
  return llvm::TypeSwitch<Attribute, int64_t>(pattern)
      .Case([&](FullAttr) { return 1; })
      .Case([&](CausalAttr) { return j <= p ? 1 : 0; })
      .Case([&](LocalAttr a) {
        int64_t w = a.getWindow();
        if (a.getCausal())
          return (p - w < j && j <= p) ? 1 : 0;
        return (p - j < w && j - p < w) ? 1 : 0;
      })
      .Case([&](StridedAttr a) {
        if (j > p)
          return 0;
        return (p - j < a.getLocal() || (p - j) % a.getStride() == 0) ? 1 : 0;
      })
      .Case([&](DilatedAttr a) {
        int64_t w = a.getSegment(), r = a.getRate();
        int64_t o = a.getHeadOffset() ? pos.head % r : 0;
        if (floorDiv(p, w) != floorDiv(j, w))
          return 0;
        if (floorMod(p, r) != o || floorMod(j, r) != o)
          return 0;
        if (a.getCausal() && j > p)
          return 0;
        return 1;
      })
      .Case([&](TokenizedAttr) {
        return (pos.row < pos.length && j < pos.length) ? 1 : 0;
      })
      .Case([&](SumAttr a) {
        int64_t m = 0;
        for (Attribute member : a.getPatterns())
          m += multiplicity(member, pos);
        return m;
      })
      .Case([&](UnionAttr a) {
        for (Attribute member : a.getPatterns())
          if (multiplicity(member, pos) > 0)
            return 1;
        return 0;
      })
      .Case([&](IntersectAttr a) {
        for (Attribute member : a.getPatterns())
          if (multiplicity(member, pos) == 0)
            return 0;
        return 1;
      })
      .Default([](Attribute) -> int64_t {
        llvm_unreachable("not a pattern attribute");
      });
}

bool mlir::attn::componentContains(ComponentAttr c, const PairPosition &pos) {
  const int64_t p = pos.row + pos.kLen - pos.qLen;
  const int64_t j = pos.key;
  const int64_t r = c.getPeriod();
  if (c.getUseLengths() && !(pos.row < pos.length && j < pos.length))
    return false;
  int64_t cls = floorMod(p, r);
  if (cls != floorMod(j, r))
    return false;
  if (c.getResidue() == ComponentAttr::kHeadResidue &&
      cls != c.classOfHead(pos.head))
    return false;
  if (c.getResidue() >= 0 && cls != c.getResidue())
    return false;
  if (c.getSegment() > 0 &&
      floorDiv(p, c.getSegment()) != floorDiv(j, c.getSegment()))
    return false;
  int64_t d = (p - j) / r; // exact: p and j share a residue class
  if (c.getBandLo() != ComponentAttr::kNegInf && d < c.getBandLo())
    return false;
  if (c.getBandHi() != ComponentAttr::kPosInf && d > c.getBandHi())
    return false;
  for (Attribute inc : c.getInclude())
    if (multiplicity(inc, pos) == 0)
      return false;
  for (Attribute exc : c.getExclude())
    if (multiplicity(exc, pos) != 0)
      return false;
  return true;
}

//===----------------------------------------------------------------------===//
// Decomposition
//===----------------------------------------------------------------------===//

namespace {
/// A component under construction.
struct ComponentSpec {
  int64_t period = 1;
  int64_t residue = ComponentAttr::kAllResidues;
  int64_t segment = 0;
  int64_t lo = ComponentAttr::kNegInf;
  int64_t hi = ComponentAttr::kPosInf;
  bool lengths = false;
  SmallVector<Attribute> include, exclude;

  ComponentAttr build(MLIRContext *ctx) const {
    const bool head = residue == ComponentAttr::kHeadResidue;
    return ComponentAttr::get(ctx, period, residue, segment, lo, hi, lengths,
                              ArrayAttr::get(ctx, include),
                              ArrayAttr::get(ctx, exclude), head ? period : 0,
                              0, 1);
  }
};
} // namespace

static ComponentSpec band(int64_t lo, int64_t hi) {
  ComponentSpec c;
  c.lo = lo;
  c.hi = hi;
  return c;
}

static SmallVector<ComponentSpec> decomposeSet(Attribute pattern);

/// The one component of a pattern's decomposition `parts` where it is a
/// plain band over positions (period 1, every row, no segments and no
/// filters: full, causal, local, or combinators of them that fold into
/// one), lengths included; none otherwise.
static std::optional<ComponentSpec> plainBand(ArrayRef<ComponentSpec> parts) {
  if (parts.size() != 1)
    return std::nullopt;
  const ComponentSpec &c = parts.front();
  if (c.period != 1 || c.residue != ComponentAttr::kAllResidues ||
      c.segment != 0 || !c.include.empty() || !c.exclude.empty())
    return std::nullopt;
  return c;
}

/// `c` narrowed to the pairs of the position band [lo, hi]: within a group
/// the rows and keys are base + period * t, so p - j = period * (t_q - t_k)
/// and the band in t is [ceil(lo / period), floor(hi / period)]. Fails
/// where the result would be empty (the caller keeps a filter instead).
static bool narrowToBand(ComponentSpec &c, int64_t lo, int64_t hi) {
  const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
  int64_t newLo = c.lo, newHi = c.hi;
  if (lo != ninf) {
    int64_t t = ceilDiv(lo, c.period);
    newLo = newLo == ninf ? t : std::max(newLo, t);
  }
  if (hi != inf) {
    int64_t t = floorDiv(hi, c.period);
    newHi = newHi == inf ? t : std::min(newHi, t);
  }
  if (newLo != ninf && newHi != inf && newLo > newHi)
    return false;
  c.lo = newLo;
  c.hi = newHi;
  return true;
}

/// `c` without the pairs of the position band `excluded` (an earlier union
/// member that is a plain band), in closed form where what is left is one
/// band: the excluded t-differences are [ceil(lo / period), floor(hi /
/// period)] (as in narrowToBand), and where they reach one end of c's band,
/// c's band starts after them or ends before them. Sets `empty` where they
/// reach both ends. Fails where they would cut a hole (the caller keeps the
/// member as an exclusion).
static bool subtractBand(ComponentSpec &c, const ComponentSpec &excluded,
                         bool &empty) {
  const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
  empty = false;
  ComponentSpec differences = band(ninf, inf);
  differences.period = c.period;
  if (!narrowToBand(differences, excluded.lo, excluded.hi))
    return true; // no difference is a multiple of the period: nothing goes
  const int64_t a = differences.lo, b = differences.hi;
  const bool reachesLow = a == ninf || (c.lo != ninf && a <= c.lo);
  const bool reachesHigh = b == inf || (c.hi != inf && b >= c.hi);
  if (reachesLow && reachesHigh)
    empty = true;
  else if (reachesLow)
    c.lo = c.lo == ninf ? b + 1 : std::max(c.lo, b + 1);
  else if (reachesHigh)
    c.hi = c.hi == inf ? a - 1 : std::min(c.hi, a - 1);
  else
    return false;
  return true;
}

/// `c` intersected with the pattern `member` in closed form where that is
/// exact: a member that is a plain band narrows c's band, and a plain band c
/// takes the geometry of a member that is one filter-free component
/// (a dilated branch, strided's classes) with its band narrowed by c's.
/// Returns false where the member stays a filter.
static bool foldIntersection(ComponentSpec &c, Attribute member) {
  SmallVector<ComponentSpec> parts = decomposeSet(member);
  if (std::optional<ComponentSpec> memberBand = plainBand(parts)) {
    ComponentSpec narrowed = c;
    if (!narrowToBand(narrowed, memberBand->lo, memberBand->hi))
      return false;
    narrowed.lengths |= memberBand->lengths;
    c = narrowed;
    return true;
  }
  if (parts.size() != 1 || !parts[0].include.empty() ||
      !parts[0].exclude.empty())
    return false;
  if (c.period != 1 || c.residue != ComponentAttr::kAllResidues ||
      c.segment != 0)
    return false;
  ComponentSpec taken = parts[0];
  if (!narrowToBand(taken, c.lo, c.hi))
    return false;
  taken.lengths |= c.lengths;
  taken.include = c.include;
  taken.exclude = c.exclude;
  c = taken;
  return true;
}

/// Appends a union's `members` to `flat` with every union or sum member
/// replaced by its own members, recursively: the patterns whose union it
/// is.
static void appendUnionMembers(ArrayAttr members,
                               SmallVectorImpl<Attribute> &flat) {
  for (Attribute member : members) {
    if (auto nested = dyn_cast<UnionAttr>(member))
      appendUnionMembers(nested.getPatterns(), flat);
    else if (auto sum = dyn_cast<SumAttr>(member))
      appendUnionMembers(sum.getPatterns(), flat);
    else
      flat.push_back(member);
  }
}

/// Components whose memberships sum to the indicator [m(pattern) > 0].
static SmallVector<ComponentSpec> decomposeSet(Attribute pattern) {
  using Specs = SmallVector<ComponentSpec>;
  const int64_t inf = ComponentAttr::kPosInf, ninf = ComponentAttr::kNegInf;
  return llvm::TypeSwitch<Attribute, Specs>(pattern)
      .Case([&](FullAttr) { return Specs{band(ninf, inf)}; })
      .Case([&](CausalAttr) { return Specs{band(0, inf)}; })
      .Case([&](LocalAttr a) {
        int64_t w = a.getWindow();
        return Specs{a.getCausal() ? band(0, w - 1) : band(-(w - 1), w - 1)};
      })
      .Case([&](StridedAttr a) {
        // The band p - j < l in natural order, plus the keys at multiples of
        // the stride beyond it: within residue class c + S*t these are the
        // causal pairs with t_q - t_k >= ceil(l / S). The two are disjoint.
        // The band goes first: on sm_90a a narrow band runs on one-step
        // blocks with resident keys (convert-attn-to-gpu), which are
        // fastest when they start the state and the per-residue component
        // merges it (bench/gpu_ab.md, "Resident keys for narrow bands").
        // With l = 1 the band is the diagonal, which is the t_q = t_k pair
        // of its residue class: one per-residue component with t_q >= t_k
        // covers the pattern, without a second pass over q, k and v.
        int64_t s = a.getStride(), l = a.getLocal();
        ComponentSpec strided = band(l == 1 ? 0 : (l + s - 1) / s, inf);
        strided.period = s;
        if (l == 1)
          return Specs{strided};
        ComponentSpec local = band(0, l - 1);
        return Specs{local, strided};
      })
      .Case([&](DilatedAttr a) {
        ComponentSpec c = a.getCausal() ? band(0, inf) : band(ninf, inf);
        c.period = a.getRate();
        c.residue = a.getHeadOffset() ? ComponentAttr::kHeadResidue : 0;
        c.segment = a.getSegment();
        return Specs{c};
      })
      .Case([&](TokenizedAttr) {
        ComponentSpec c = band(ninf, inf);
        c.lengths = true;
        return Specs{c};
      })
      .Case([&](UnionAttr a) {
        // Member k contributes only the pairs no earlier member attends, so
        // no pair is counted twice.
        // An earlier member that is a plain band (full, causal, local)
        // comes off the component's band instead where what is left is one
        // band (subtractBand): a causal look-ahead window after causal is
        // the band [-(W-1), -1], with no predicate. A union is the same in
        // any order and over any nesting, so its members are taken as one
        // flat list (a union or sum member gives its own members: each
        // pair counts once either way) with the plain bands first, for
        // the later members to subtract rather than filter by.
        SmallVector<Attribute> flat, members, others;
        appendUnionMembers(a.getPatterns(), flat);
        for (Attribute member : flat)
          (isa<FullAttr, CausalAttr, LocalAttr>(member) ? members : others)
              .push_back(member);
        llvm::append_range(members, others);
        Specs result;
        SmallVector<std::pair<Attribute, std::optional<ComponentSpec>>> earlier;
        for (Attribute member : members) {
          SmallVector<ComponentSpec> parts = decomposeSet(member);
          for (ComponentSpec c : parts) {
            // The earlier plain bands come off c's band while one does: a
            // band that would cut a hole may come off, or miss c, once
            // another has narrowed it (a causal window would cut a hole in
            // a full band, and misses what causal leaves of it). The rest
            // filter c. (A band under lengths attends only pairs within
            // them.)
            bool empty = false;
            SmallVector<bool> subtracted(earlier.size(), false);
            for (bool progress = true; progress && !empty;) {
              progress = false;
              for (auto [i, e] : llvm::enumerate(earlier)) {
                const std::optional<ComponentSpec> &eBand = e.second;
                if (subtracted[i] || !eBand || eBand->lengths ||
                    !subtractBand(c, *eBand, empty))
                  continue;
                subtracted[i] = progress = true;
                if (empty)
                  break;
              }
            }
            if (empty)
              continue;
            for (auto [i, e] : llvm::enumerate(earlier))
              if (!subtracted[i])
                c.exclude.push_back(e.first);
            result.push_back(c);
          }
          earlier.push_back({member, plainBand(parts)});
        }
        return result;
      })
      .Case([&](IntersectAttr a) {
        // Tokenized members only restrict rows and keys to the lengths; the
        // first other member gives the geometry and the rest filter it.
        bool lengths = false;
        SmallVector<Attribute> others;
        for (Attribute member : a.getPatterns()) {
          if (isa<TokenizedAttr>(member))
            lengths = true;
          else
            others.push_back(member);
        }
        // The geometry comes from the first member that is not a plain
        // band (full, causal, local), since bands fold into any geometry.
        // Members that are one closed-form component fold into it (a local
        // window within a dilated branch's segments is a band in its
        // groups; foldIntersection) rather than filter every tile by
        // predicate; the rest filter.
        auto geometry = llvm::find_if_not(others, [](Attribute member) {
          return isa<FullAttr, CausalAttr, LocalAttr>(member);
        });
        if (geometry == others.end())
          geometry = others.begin();
        Specs result =
            others.empty() ? Specs{band(ninf, inf)} : decomposeSet(*geometry);
        for (ComponentSpec &c : result) {
          c.lengths |= lengths;
          for (auto it = others.begin(); it != others.end(); ++it)
            if (it != geometry && !foldIntersection(c, *it))
              c.include.push_back(*it);
        }
        return result;
      })
      .Case([&](SumAttr a) {
        // A sum inside a set combinator counts each of its pairs once:
        // multiplicities are never negative, so [sum of m_k > 0] is
        // [some m_k > 0], the union of its members (closed forms, where a
        // full band filtered by the sum would score every pair).
        return decomposeSet(UnionAttr::get(a.getContext(), a.getPatterns()));
      })
      .Default([](Attribute) -> Specs {
        llvm_unreachable("not a pattern attribute");
      });
}

SmallVector<ComponentAttr> mlir::attn::decompose(Attribute pattern) {
  SmallVector<ComponentAttr> result;
  if (auto sum = dyn_cast<SumAttr>(pattern)) {
    for (Attribute member : sum.getPatterns())
      llvm::append_range(result, decompose(member));
    return result;
  }
  for (const ComponentSpec &c : decomposeSet(pattern))
    result.push_back(c.build(pattern.getContext()));
  return result;
}

//===----------------------------------------------------------------------===//
// Predicates as IR
//===----------------------------------------------------------------------===//


std::pair<Value, Value> mlir::attn::buildHeadClass(OpBuilder &b, Location loc,
                                                   ComponentAttr c,
                                                   Value head) {
  IndexMath m{b, loc};
  Value x = arith::RemUIOp::create(b, loc, head, m.c(c.getHeadMod()));
  if (c.isPlainHeadResidue())
    return {x, m.truth(true)};
  x = m.sub(x, m.c(c.getHeadOffset()));
  // x >= 0, d | x and x / d < period; the class is clamped to 0 otherwise so
  // that it stays a valid index for code that runs before the check.
  Value valid = m.both(m.le(m.c(0), x),
                       m.eq(m.floorMod(x, c.getHeadDiv()), m.c(0)));
  Value cls = m.floorDiv(x, c.getHeadDiv());
  valid = m.both(valid, m.lt(cls, m.c(c.getPeriod())));
  cls = arith::SelectOp::create(b, loc, valid, cls, m.c(0));
  return {cls, valid};
}

/// The combinators, for the IR builders below: the OR of `member` over the
/// members of a sum or union, the AND over those of an intersection; null
/// for a leaf pattern.
static Value combineMembers(IndexMath &m, Attribute pattern,
                            function_ref<Value(Attribute)> member) {
  bool isAnd = isa<IntersectAttr>(pattern);
  ArrayRef<Attribute> members;
  if (auto a = dyn_cast<SumAttr>(pattern))
    members = a.getPatterns().getValue();
  else if (auto a = dyn_cast<UnionAttr>(pattern))
    members = a.getPatterns().getValue();
  else if (auto a = dyn_cast<IntersectAttr>(pattern))
    members = a.getPatterns().getValue();
  else
    return Value();
  Value result = m.truth(isAnd);
  for (Attribute x : members)
    result = isAnd ? m.both(result, member(x)) : m.either(result, member(x));
  return result;
}

Value mlir::attn::buildPatternPredicate(OpBuilder &b, Location loc,
                                        Attribute pattern, Value head,
                                        Value row, Value key, Value qLen,
                                        Value kLen, Value length) {
  IndexMath m{b, loc};
  Value p = m.add(row, m.sub(kLen, qLen));
  Value j = key;
  auto recurse = [&](Attribute member) {
    return buildPatternPredicate(b, loc, member, head, row, key, qLen, kLen,
                                 length);
  };
  if (Value combined = combineMembers(m, pattern, recurse))
    return combined;
  return llvm::TypeSwitch<Attribute, Value>(pattern)
      .Case([&](FullAttr) { return m.truth(true); })
      .Case([&](CausalAttr) { return m.le(j, p); })
      .Case([&](LocalAttr a) {
        Value w = m.c(a.getWindow());
        Value d = m.sub(p, j);
        if (a.getCausal())
          return m.both(m.le(j, p), m.lt(d, w));
        return m.both(m.lt(d, w), m.lt(m.sub(j, p), w));
      })
      .Case([&](StridedAttr a) {
        Value d = m.sub(p, j);
        Value inBand = m.lt(d, m.c(a.getLocal()));
        Value onStride = m.eq(m.floorMod(d, a.getStride()), m.c(0));
        return m.both(m.le(j, p), m.either(inBand, onStride));
      })
      .Case([&](DilatedAttr a) {
        int64_t w = a.getSegment(), r = a.getRate();
        Value o = a.getHeadOffset() ? m.floorMod(head, r) : m.c(0);
        Value result = m.eq(m.floorDiv(p, w), m.floorDiv(j, w));
        result = m.both(result, m.eq(m.floorMod(p, r), o));
        result = m.both(result, m.eq(m.floorMod(j, r), o));
        if (a.getCausal())
          result = m.both(result, m.le(j, p));
        return result;
      })
      .Case([&](TokenizedAttr) {
        assert(length && "tokenized predicate needs lengths");
        return m.both(m.lt(row, length), m.lt(j, length));
      })
      .Default([](Attribute) -> Value {
        llvm_unreachable("not a pattern attribute");
      });
}

Value mlir::attn::buildPatternMayHitTile(OpBuilder &b, Location loc,
                                         Attribute pattern, Value pLo,
                                         Value pHi, Value jLo, Value jHi) {
  IndexMath m{b, loc};
  auto recurse = [&](Attribute member) {
    return buildPatternMayHitTile(b, loc, member, pLo, pHi, jLo, jHi);
  };
  if (Value combined = combineMembers(m, pattern, recurse))
    return combined;
  // Some key at or before some position: j <= p for a pair of the tile.
  Value someCausal = m.le(jLo, pHi);
  return llvm::TypeSwitch<Attribute, Value>(pattern)
      .Case([&](CausalAttr) { return someCausal; })
      .Case([&](StridedAttr) { return someCausal; })
      .Case([&](LocalAttr a) {
        // |p - j| < w for a pair: the closest pair is (pLo, jHi) on the
        // causal side and (pHi, jLo) on the other.
        Value w = m.c(a.getWindow());
        Value nearBehind = m.lt(m.sub(pLo, jHi), w);
        if (a.getCausal())
          return m.both(someCausal, nearBehind);
        return m.both(nearBehind, m.lt(m.sub(jLo, pHi), w));
      })
      .Case([&](DilatedAttr a) {
        // p and j in one segment: the segment ranges of the rows and of the
        // keys overlap (the residue conditions are left to the mask).
        Value w = m.c(a.getSegment());
        Value overlap = m.both(m.le(m.floorDiv(pLo, w), m.floorDiv(jHi, w)),
                               m.le(m.floorDiv(jLo, w), m.floorDiv(pHi, w)));
        return a.getCausal() ? m.both(overlap, someCausal) : overlap;
      })
      .Default([&](Attribute) { return m.truth(true); });
}
