//===- TilePairs.cpp - the pairs of one tile, for the CPU lowerings -------===//
//
// See TilePairs.h.
//
//===----------------------------------------------------------------------===//

#include "TilePairs.h"

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Pattern/Pattern.h"

#include "mlir/Dialect/SCF/IR/SCF.h"

using namespace mlir;
using namespace mlir::attn;

TilePairs::TilePairs(OpBuilder &b, Location loc, ComponentAttr comp,
                     Value query, Value key, Value lengths, Value keyBias,
                     Value keyIds, Value batch, Value head, Value base,
                     ValueRange origins, double scale, bool masked)
    : b(b), loc(loc), f{b, loc}, m{b, loc}, comp(comp), q(query), k(key),
      keyBias(keyBias), keyIds(keyIds), bIdx(batch), h(head), base(base),
      masked(masked) {
  r = m.c(comp.getPeriod());
  Value heads = memref::DimOp::create(b, loc, q, dims::kHeads);
  Value kvHeads = memref::DimOp::create(b, loc, k, dims::kHeads);
  Value qLen = memref::DimOp::create(b, loc, q, dims::kRows);
  Value kLen = keyCount(b, loc, k, keyIds);
  d = memref::DimOp::create(b, loc, q, dims::kHeadDim);
  g = arith::DivUIOp::create(b, loc, h,
                             arith::DivUIOp::create(b, loc, heads, kvHeads));
  // Row index = position - qOrigin, key index = position - kOrigin. With
  // origins the filters see positions q_pos + stride * i and
  // k_pos + stride * j (AttnOrigins.h), as rows of a square problem.
  at = Placement::decode(m, origins, qLen, kLen);
  predQLen = at.hasOrigins ? m.c(0) : qLen;
  predKLen = at.hasOrigins ? m.c(0) : kLen;
  this->scale = f.c(float(scale));
  if (lengths) {
    length = memref::LoadOp::create(b, loc, lengths, bIdx);
    length = arith::IndexCastOp::create(b, loc, b.getIndexType(), length);
  }
}

Value TilePairs::rowIndex(Value tq) {
  return m.sub(m.add(base, m.mul(r, tq)), at.qOrigin);
}

Value TilePairs::keyIndex(Value tk) {
  return m.sub(m.add(base, m.mul(r, tk)), at.kOrigin);
}

std::pair<Value, Value> TilePairs::keyRow(Value j) {
  if (!keyIds)
    return {bIdx, j};
  Value id = memref::LoadOp::create(b, loc, keyIds, ValueRange{bIdx, j});
  return {m.c(0), arith::IndexCastOp::create(b, loc, b.getIndexType(), id)};
}

Value TilePairs::score(Value tq, Value i, Value tk, Value j) {
  auto dot = [&]() {
    auto [kb, kRow] = keyRow(j);
    Value sum = reduce(b, loc, m.c(0), d, f.c(0.0f), [&](Value e, Value acc) {
      Value qd = f.load(q, ValueRange{bIdx, h, i, e});
      Value kd = f.load(k, ValueRange{kb, g, kRow, e});
      return f.fma(qd, kd, acc);
    });
    Value s = f.mul(scale, sum);
    if (keyBias) // log(count), -inf for ignored keys
      s = f.add(s, memref::LoadOp::create(b, loc, keyBias, ValueRange{bIdx, j}));
    return s;
  };
  if (!masked)
    return dot();
  // In the band lo <= t_q - t_k <= hi, in every include pattern and in no
  // exclude pattern.
  // Without origins the predicates take row indices and key positions
  // (= indices) with both lengths, and align the rows bottom-right themselves.
  Value predRow = at.hasOrigins ? m.add(at.qPos, m.mul(at.stride, i)) : i;
  Value predKey = at.hasOrigins ? m.add(at.kPos, m.mul(at.stride, j)) : j;
  Value inside = m.truth(true);
  Value dt = m.sub(tq, tk);
  if (comp.getBandLo() != ComponentAttr::kNegInf)
    inside = m.both(inside, m.le(m.c(comp.getBandLo()), dt));
  if (comp.getBandHi() != ComponentAttr::kPosInf)
    inside = m.both(inside, m.le(dt, m.c(comp.getBandHi())));
  for (Attribute inc : comp.getInclude())
    inside = m.both(inside, buildPatternPredicate(b, loc, inc, h, predRow,
                                                  predKey, predQLen, predKLen,
                                                  length));
  for (Attribute exc : comp.getExclude()) {
    Value in = buildPatternPredicate(b, loc, exc, h, predRow, predKey,
                                     predQLen, predKLen, length);
    inside = m.both(inside, m.eq(in, m.truth(false)));
  }
  auto ifOp = scf::IfOp::create(b, loc, TypeRange{b.getF32Type()}, inside,
                                /*withElse=*/true);
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(ifOp.thenBlock());
  scf::YieldOp::create(b, loc, dot());
  b.setInsertionPointToStart(ifOp.elseBlock());
  scf::YieldOp::create(b, loc, f.negInf());
  return ifOp.getResult(0);
}
