//===- PatternTest.cpp - the pattern library against hand-computed masks --===//
//
// m(h, i, j) of every leaf and combinator compared with masks written out by
// hand for small cases, including Lq != Lk (bottom-right alignment), fully
// masked rows and tokenized lengths; then, for many patterns and shapes, the
// decomposition's memberships summed must equal m for every pair, and the
// GPU kernels' tile test (buildPatternMayHitTile) must be true on every tile
// that holds a pair of the pattern.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "attn/Pattern/Pattern.h"
#include "attn/Pattern/Reference.h"

#include "mlir/AsmParser/AsmParser.h"
#include "mlir/Dialect/Arith/IR/Arith.h"
#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/Transforms/GreedyPatternRewriteDriver.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

using namespace mlir;
using namespace mlir::attn;

namespace {

class PatternTest : public ::testing::Test {
protected:
  PatternTest() { ctx.loadDialect<AttnDialect>(); }
  Attribute parse(const std::string &text) {
    Attribute a = parseAttribute(text, &ctx);
    EXPECT_TRUE(a) << "cannot parse " << text;
    return a;
  }
  /// The mask of `pattern` for head h as rows of '1'/'0' (multiplicities as digits).
  std::vector<std::string> mask(Attribute pattern, int64_t lq, int64_t lk,
                                int64_t h = 0, int64_t length = -1) {
    std::vector<std::string> rows;
    for (int64_t i = 0; i < lq; ++i) {
      std::string row;
      for (int64_t j = 0; j < lk; ++j)
        row += char('0' + multiplicity(pattern, {h, i, j, lq, lk, length}));
      rows.push_back(row);
    }
    return rows;
  }
  MLIRContext ctx;
};

using Rows = std::vector<std::string>;

TEST_F(PatternTest, Causal) {
  EXPECT_EQ(mask(parse("#attn.causal"), 4, 4),
            (Rows{"1000", "1100", "1110", "1111"}));
  // Lq < Lk: bottom-right aligned, row i sits at key position i + 2.
  EXPECT_EQ(mask(parse("#attn.causal"), 2, 4), (Rows{"1110", "1111"}));
  // Lq > Lk: the first rows see no key at all.
  EXPECT_EQ(mask(parse("#attn.causal"), 4, 2), (Rows{"00", "00", "10", "11"}));
}

TEST_F(PatternTest, Local) {
  EXPECT_EQ(mask(parse("#attn.local<window = 2>"), 4, 4),
            (Rows{"1000", "1100", "0110", "0011"}));
  EXPECT_EQ(mask(parse("#attn.local<window = 2, causal = false>"), 4, 4),
            (Rows{"1100", "1110", "0111", "0011"}));
}

TEST_F(PatternTest, Strided) {
  // stride 3, local 2: j <= i and (i - j < 2 or (i - j) % 3 == 0).
  EXPECT_EQ(mask(parse("#attn.strided<stride = 3, local = 2>"), 7, 7),
            (Rows{"1000000", "1100000", "0110000", "1011000", "0101100",
                  "0010110", "1001011"}));
}

TEST_F(PatternTest, Dilated) {
  // segment 4, rate 2, offset 0: even positions within each segment of 4.
  EXPECT_EQ(mask(parse("#attn.dilated<segment = 4, rate = 2>"), 8, 8),
            (Rows{"10100000", "00000000", "10100000", "00000000", "00001010",
                  "00000000", "00001010", "00000000"}));
  // head_offset: head 1 takes the odd positions; causal keeps j <= i.
  EXPECT_EQ(mask(parse("#attn.dilated<segment = 4, rate = 2, head_offset = "
                       "true, causal = true>"),
                 4, 4, /*h=*/1),
            (Rows{"0000", "0100", "0000", "0101"}));
}

TEST_F(PatternTest, Tokenized) {
  EXPECT_EQ(mask(parse("#attn.tokenized<>"), 4, 4, 0, /*length=*/2),
            (Rows{"1100", "1100", "0000", "0000"}));
  EXPECT_EQ(mask(parse("#attn.tokenized<>"), 3, 3, 0, /*length=*/0),
            (Rows{"000", "000", "000"}));
  EXPECT_EQ(mask(parse("#attn.intersect<[#attn.causal, #attn.tokenized<>]>"),
                 4, 4, 0, 3),
            (Rows{"1000", "1100", "1110", "0000"}));
}

TEST_F(PatternTest, Combinators) {
  EXPECT_EQ(mask(parse("#attn.sum<[#attn.causal, #attn.local<window = 2>]>"),
                 3, 3),
            (Rows{"200", "220", "122"}));
  EXPECT_EQ(mask(parse("#attn.union<[#attn.causal, #attn.local<window = 2>]>"),
                 3, 3),
            (Rows{"100", "110", "111"}));
  EXPECT_EQ(mask(parse("#attn.intersect<[#attn.causal, #attn.local<window = "
                       "2, causal = false>]>"),
                 3, 3),
            (Rows{"100", "110", "011"}));
}

TEST_F(PatternTest, DecompositionSumsToMultiplicity) {
  const char *patterns[] = {
      "#attn.full",
      "#attn.causal",
      "#attn.local<window = 5>",
      "#attn.local<window = 4, causal = false>",
      "#attn.strided<stride = 4, local = 4>",
      "#attn.strided<stride = 3, local = 7>",
      "#attn.strided<stride = 5, local = 2>",
      "#attn.strided<stride = 4, local = 1>",
      "#attn.strided<stride = 1, local = 1>",
      "#attn.dilated<segment = 8, rate = 2, head_offset = true>",
      "#attn.dilated<segment = 12, rate = 3, causal = true>",
      "#attn.tokenized<>",
      "#attn.sum<[#attn.dilated<segment = 4, rate = 1, causal = true>, "
      "#attn.dilated<segment = 16, rate = 4, head_offset = true, causal = "
      "true>]>",
      "#attn.sum<[#attn.causal, #attn.causal, #attn.local<window = 3>]>",
      "#attn.union<[#attn.local<window = 3>, #attn.strided<stride = 4, local "
      "= 1>, #attn.dilated<segment = 8, rate = 2>]>",
      "#attn.union<[#attn.sum<[#attn.causal, #attn.causal]>, #attn.full]>",
      "#attn.intersect<[#attn.strided<stride = 3, local = 3>, #attn.local<"
      "window = 9>]>",
      "#attn.intersect<[#attn.causal, #attn.tokenized<>]>",
      "#attn.union<[#attn.tokenized<>, #attn.local<window = 2>]>",
      // Intersections folded into closed forms (foldIntersection), one
      // left as a filter where the folded band would be empty, and bands
      // taking the geometry of a member that carries exclusions.
      "#attn.intersect<[#attn.local<window = 7, causal = false>, "
      "#attn.dilated<segment = 8, rate = 2, head_offset = true>]>",
      "#attn.intersect<[#attn.local<window = 11>, #attn.strided<stride = 4, "
      "local = 2>, #attn.causal]>",
      "#attn.intersect<[#attn.local<window = 3>, #attn.strided<stride = 4, "
      "local = 2>, #attn.dilated<segment = 8, rate = 2>]>",
      "#attn.intersect<[#attn.local<window = 6, causal = false>, "
      "#attn.strided<stride = 3, local = 1>]>",
      "#attn.intersect<[#attn.union<[#attn.local<window = 2>, "
      "#attn.strided<stride = 3, local = 1>]>, #attn.dilated<segment = 12, "
      "rate = 3, causal = true>, #attn.local<window = 9, causal = false>]>",
      // Unions whose earlier bands come off the later members' bands
      // (subtractBand): one end, the whole band (dropped), a hole (kept as
      // an exclusion), multiples of a period, and tokenized lengths (kept).
      "#attn.union<[#attn.local<window = 3>, #attn.causal]>",
      "#attn.union<[#attn.causal, #attn.local<window = 5, causal = false>]>",
      "#attn.union<[#attn.causal, #attn.local<window = 4>]>",
      "#attn.union<[#attn.local<window = 3>, #attn.full]>",
      "#attn.union<[#attn.local<window = 7, causal = false>, "
      "#attn.strided<stride = 3, local = 1>, #attn.dilated<segment = 12, "
      "rate = 2, causal = true>]>",
      "#attn.union<[#attn.local<window = 2>, #attn.strided<stride = 4, "
      "local = 3>, #attn.local<window = 9, causal = false>]>",
      "#attn.union<[#attn.tokenized<>, #attn.causal]>",
      // Unions over nested unions and sums (one flat list of members, the
      // plain bands first), a band taken off once another has narrowed
      // the member (the full band's hole closes after causal), and sums
      // inside intersections.
      "#attn.union<[#attn.dilated<segment = 8, rate = 2>, #attn.local<"
      "window = 3>, #attn.causal, #attn.local<window = 2>]>",
      "#attn.union<[#attn.sum<[#attn.local<window = 3>, #attn.dilated<"
      "segment = 8, rate = 2, causal = true>]>, #attn.union<[#attn.strided<"
      "stride = 4, local = 1>, #attn.full]>]>",
      "#attn.union<[#attn.full, #attn.local<window = 4, causal = false>, "
      "#attn.causal]>",
      "#attn.union<[#attn.sum<[#attn.sum<[#attn.causal, #attn.causal]>, "
      "#attn.dilated<segment = 6, rate = 3, head_offset = true>]>, "
      "#attn.local<window = 5, causal = false>]>",
      "#attn.intersect<[#attn.sum<[#attn.local<window = 4>, #attn.strided<"
      "stride = 3, local = 1>]>, #attn.dilated<segment = 12, rate = 1>]>",
      "#attn.intersect<[#attn.intersect<[#attn.local<window = 9, causal = "
      "false>, #attn.tokenized<>]>, #attn.intersect<[#attn.dilated<segment = "
      "12, rate = 2, head_offset = true>, #attn.causal]>]>",
  };
  const std::pair<int64_t, int64_t> shapes[] = {{17, 17}, {5, 23}, {23, 5}, {1, 1}};
  for (const char *text : patterns) {
    Attribute pattern = parse(text);
    SmallVector<ComponentAttr> components = decompose(pattern);
    ASSERT_FALSE(components.empty()) << text;
    for (auto [lq, lk] : shapes)
      for (int64_t h = 0; h < 4; ++h)
        for (int64_t length : {int64_t(-1), int64_t(0), lk / 2, lk})
          for (int64_t i = 0; i < lq; ++i)
            for (int64_t j = 0; j < lk; ++j) {
              PairPosition pos{h, i, j, lq, lk, length};
              if (cast<PatternAttrInterface>(pattern).usesLengths() && length < 0)
                continue;
              int64_t sum = 0;
              for (ComponentAttr c : components)
                sum += componentContains(c, pos) ? 1 : 0;
              ASSERT_EQ(sum, multiplicity(pattern, pos))
                  << text << " h=" << h << " i=" << i << " j=" << j
                  << " Lq=" << lq << " Lk=" << lk << " len=" << length;
            }
  }
}

TEST_F(PatternTest, ReferenceEmptyRowsAndWeights) {
  // Lq = 3 > Lk = 2, causal: row 0 attends nothing -> out 0, lse -inf.
  ReferenceShape s{1, 1, 1, 3, 2, 1};
  std::vector<float> q{1, 2, 3}, k{0.5f, -1}, v{2, 4};
  std::vector<double> out, lse;
  referenceAttention(parse("#attn.causal"), 1.0, s, q.data(), k.data(),
                     v.data(), {}, out, lse);
  EXPECT_EQ(out[0], 0.0);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);
  // Row 1 sits at key position 0: only key 0.
  EXPECT_DOUBLE_EQ(out[1], 2.0);
  EXPECT_DOUBLE_EQ(lse[1], 2.0 * 0.5);
  // Row 2 (position 1) with a sum of two causals: multiplicity 2 for both keys;
  // O is unchanged by a uniform weight, LSE grows by log 2.
  std::vector<double> out2, lse2;
  referenceAttention(parse("#attn.sum<[#attn.causal, #attn.causal]>"), 1.0, s,
                     q.data(), k.data(), v.data(), {}, out2, lse2);
  EXPECT_NEAR(out2[2], out[2], 1e-12);
  EXPECT_NEAR(lse2[2], lse[2] + std::log(2.0), 1e-12);
}

/// Evaluates buildPatternMayHitTile on constants: the IR is built into a
/// function returning the i1, then folded down to one constant.
bool mayHitTile(MLIRContext &ctx, Attribute pattern, int64_t pLo, int64_t pHi,
                int64_t jLo, int64_t jHi) {
  OpBuilder b(&ctx);
  Location loc = b.getUnknownLoc();
  OwningOpRef<ModuleOp> module = ModuleOp::create(loc);
  b.setInsertionPointToEnd(module->getBody());
  auto fn = func::FuncOp::create(b, loc, "tile",
                                 b.getFunctionType({}, {b.getI1Type()}));
  b.setInsertionPointToStart(fn.addEntryBlock());
  auto c = [&](int64_t v) -> Value {
    return arith::ConstantIndexOp::create(b, loc, v);
  };
  Value hit = buildPatternMayHitTile(b, loc, pattern, c(pLo), c(pHi), c(jLo),
                                     c(jHi));
  func::ReturnOp::create(b, loc, hit);
  EXPECT_TRUE(succeeded(applyPatternsGreedily(fn, RewritePatternSet(&ctx))));
  Value folded = fn.getBody().front().getTerminator()->getOperand(0);
  auto constant = folded.getDefiningOp<arith::ConstantOp>();
  EXPECT_TRUE(constant) << "the tile test did not fold to a constant";
  return constant && cast<BoolAttr>(constant.getValue()).getValue();
}

TEST_F(PatternTest, MayHitTileCoversEveryPair) {
  ctx.loadDialect<arith::ArithDialect, func::FuncDialect>();
  const char *patterns[] = {
      "#attn.full",
      "#attn.causal",
      "#attn.local<window = 5>",
      "#attn.local<window = 4, causal = false>",
      "#attn.strided<stride = 4, local = 2>",
      "#attn.dilated<segment = 8, rate = 2, head_offset = true>",
      "#attn.dilated<segment = 6, rate = 1, causal = true>",
      "#attn.union<[#attn.dilated<segment = 4, rate = 1, causal = true>, "
      "#attn.local<window = 3>]>",
      "#attn.sum<[#attn.dilated<segment = 8, rate = 1, causal = true>, "
      "#attn.dilated<segment = 16, rate = 4, head_offset = true, causal = "
      "true>]>",
      "#attn.intersect<[#attn.causal, #attn.local<window = 6, causal = "
      "false>]>",
  };
  const int64_t n = 24; // positions 0..n-1, Lq = Lk = n (p = i)
  for (const char *text : patterns) {
    Attribute pattern = parse(text);
    int tiles = 0, skipped = 0;
    for (int64_t pLo = 0; pLo < n; pLo += 3)
      for (int64_t pHi = pLo; pHi < std::min(n, pLo + 7); pHi += 2)
        for (int64_t jLo = 0; jLo < n; jLo += 3)
          for (int64_t jHi = jLo; jHi < std::min(n, jLo + 7); jHi += 3) {
            bool any = false;
            for (int64_t h = 0; h < 4 && !any; ++h)
              for (int64_t p = pLo; p <= pHi && !any; ++p)
                for (int64_t j = jLo; j <= jHi && !any; ++j)
                  any = multiplicity(pattern, {h, p, j, n, n, -1}) > 0;
            bool may = mayHitTile(ctx, pattern, pLo, pHi, jLo, jHi);
            ++tiles;
            skipped += may ? 0 : 1;
            ASSERT_TRUE(may || !any)
                << text << ": the tile p in [" << pLo << ", " << pHi
                << "], j in [" << jLo << ", " << jHi
                << "] holds a pair but the test says it cannot";
          }
    // The test must also rule tiles out where it can, or it saves nothing.
    if (StringRef(text) != "#attn.full")
      EXPECT_GT(skipped, 0) << text << ": no tile ruled out of " << tiles;
  }
}

} // namespace
