//===- InsertRingComm.cpp - split attention across ranks ------------------===//
//
// attn-insert-ring-comm: the bufferized attention function of a module with
// `attn.distribution` becomes one function per rank. Each runs init_state,
// then the ring steps of its plan (attn/Pattern/RingPlan.h) — an
// attn.ring_exchange of exactly the rows the receiver attends, and the
// component updates that have a pair, on subviews of the rank's pieces with
// their global origins — then finalize. The state is one f32
// (acc, max, sum) over the rank's query chunk, continued across steps.
// Query rows (q, out, lse) and key rows (k, v) are split alike; with
// Lq != Lk (cross attention) their chunks differ and the query origins
// carry the bottom-right shift Lk - Lq.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/IR/AttnDims.h"
#include "attn/Dialect/Attn/Transforms/Passes.h"
#include "attn/Pattern/RingPlan.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/Dialect/MemRef/IR/MemRef.h"

namespace mlir::attn {
#define GEN_PASS_DEF_ATTNINSERTRINGCOMM
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

namespace {

/// `array<i64: start, len, count, pitch, ...>` per row set.
ArrayAttr rowSetsAttr(Builder &b, const std::vector<RowSet> &sets) {
  SmallVector<Attribute> attrs;
  for (const RowSet &set : sets) {
    SmallVector<int64_t> flat;
    for (const RowRun &r : set.runs)
      flat.append({r.start, r.len, r.count, r.pitch});
    attrs.push_back(b.getDenseI64ArrayAttr(flat));
  }
  return b.getArrayAttr(attrs);
}

/// The memref type of `type` with `rows` rows (dimension kRows).
MemRefType withRows(MemRefType type, int64_t rows) {
  SmallVector<int64_t> shape(type.getShape());
  shape[dims::kRows] = rows;
  return MemRefType::get(shape, type.getElementType());
}

struct AttnInsertRingCommPass
    : public mlir::attn::impl::AttnInsertRingCommBase<AttnInsertRingCommPass> {
  using AttnInsertRingCommBase::AttnInsertRingCommBase;

  void runOnOperation() override {
    ModuleOp module = getOperation();
    auto dist = module->getAttrOfType<DictionaryAttr>("attn.distribution");
    if (!dist)
      return; // nothing to distribute
    auto ranks = dist.getAs<IntegerAttr>("ranks");
    auto layout = dist.getAs<StringAttr>("layout");
    auto kv = dist.getAs<StringAttr>("kv");
    if (!ranks || !layout || !kv || ranks.getInt() < 1) {
      module.emitError("attn-insert-ring-comm: attn.distribution needs "
                       "ranks >= 1, layout and kv");
      return signalPassFailure();
    }
    SmallVector<func::FuncOp> funcs;
    module.walk([&](func::FuncOp f) {
      if (!f.getOps<ComponentOp>().empty())
        funcs.push_back(f);
    });
    for (func::FuncOp f : funcs)
      if (failed(distribute(f, ranks.getInt(), layout.str(), kv.str())))
        return signalPassFailure();
  }

  LogicalResult distribute(func::FuncOp f, int64_t ranks,
                           const std::string &layout, const std::string &kv) {
    // Expect the bufferized form: q, k, v[, lengths], out[, lse].
    std::vector<ComponentAttr> components;
    ComponentOp first;
    for (ComponentOp c : f.getOps<ComponentOp>()) {
      if (c.getNumResults() != 0)
        return c.emitError("attn-insert-ring-comm: run attn-bufferize first");
      if (!c.getOrigins().empty())
        return c.emitError("attn-insert-ring-comm: already distributed");
      if (c.getKeyBias() || c.getKeyIds())
        return c.emitError("attn-insert-ring-comm: key_bias and key_ids are "
                           "not distributed over a ring (distributed "
                           "tokenized attention exchanges embeddings instead, "
                           "docs/Tokenized.md)");
      components.push_back(c.getComponent());
      if (!first)
        first = c;
    }
    auto fin = *f.getOps<FinalizeOp>().begin();
    auto qType = dyn_cast<MemRefType>(first.getQuery().getType());
    auto kType = dyn_cast<MemRefType>(first.getKey().getType());
    if (!qType || !kType || !qType.hasStaticShape() || !kType.hasStaticShape())
      return f.emitError("attn-insert-ring-comm: ring attention needs static "
                         "shapes (give seq_len in the spec)");
    const int64_t qLen = qType.getDimSize(dims::kRows);
    const int64_t kvLen = kType.getDimSize(dims::kRows);
    // Lengths count query rows, which the kernels locate by position: with
    // a bottom-right shift the two differ.
    if (qLen != kvLen && first.getLengths())
      return f.emitError("attn-insert-ring-comm: tokenized lengths need equal "
                         "query and key lengths under a ring, got ")
             << qLen << " and " << kvLen;
    const int64_t heads = qType.getDimSize(dims::kHeads);
    const int64_t kvHeads = kType.getDimSize(dims::kHeads);
    std::string error;
    std::optional<RingPlan> plan = planRing(
        components, heads, kvHeads, qLen, kvLen, ranks, layout, kv, error);
    if (!plan)
      return f.emitError("attn-insert-ring-comm: ") << error;

    Value lengthsArg = first.getLengths();
    for (int64_t r = 0; r < ranks; ++r)
      emitRank(f, *plan, r, first, fin, lengthsArg);
    f.erase();
    return success();
  }

  void emitRank(func::FuncOp f, const RingPlan &plan, int64_t rank,
                ComponentOp first, FinalizeOp fin, Value lengthsArg) {
    OpBuilder b(f);
    Location loc = f.getLoc();
    // Local argument types: the rows of every [B, H, L(, D)] argument
    // become the rank's chunk (of keys for k and v, of queries for the
    // rest); lengths stay global.
    SmallVector<Type> inputs;
    for (BlockArgument arg : f.getArguments()) {
      auto type = cast<MemRefType>(arg.getType());
      bool keyRows = arg == first.getKey() || arg == first.getValue();
      inputs.push_back(arg == lengthsArg ? type
                                         : withRows(type, keyRows ? plan.kvChunk
                                                                  : plan.qChunk));
    }
    auto rf = func::FuncOp::create(
        b, loc, (f.getName() + "_rank" + Twine(rank)).str(),
        b.getFunctionType(inputs, {}));
    rf->setAttr("attn.rank", b.getI64IntegerAttr(rank));
    rf->setAttr("attn.ranks", b.getI64IntegerAttr(plan.ranks));
    rf->setAttr("attn.layout", b.getStringAttr(plan.layout));
    rf->setAttr("attn.kv", b.getStringAttr(plan.kv));
    Block *entry = rf.addEntryBlock();
    b.setInsertionPointToStart(entry);
    auto local = [&](Value v) {
      return entry->getArgument(cast<BlockArgument>(v).getArgNumber());
    };
    Value q = local(first.getQuery()), k = local(first.getKey()),
          v = local(first.getValue());
    Value lengths = lengthsArg ? local(lengthsArg) : Value();
    auto qType = cast<MemRefType>(q.getType());
    auto kType = cast<MemRefType>(k.getType());
    auto f32 = b.getF32Type();
    SmallVector<int64_t> accShape(qType.getShape());
    SmallVector<int64_t> rowShape(accShape.begin(), accShape.end() - 1);
    Value acc = memref::AllocOp::create(b, loc, MemRefType::get(accShape, f32));
    Value max = memref::AllocOp::create(b, loc, MemRefType::get(rowShape, f32));
    Value sum = memref::AllocOp::create(b, loc, MemRefType::get(rowShape, f32));
    InitStateOp::create(b, loc, TypeRange{}, acc, max, sum);

    // Received rows land in one of two buffers (double buffering: step s
    // computes on one while step s + 1 receives into the other).
    Value kBuf[2], vBuf[2];
    auto buffer = [&](int slot) {
      if (!kBuf[slot]) {
        kBuf[slot] = memref::AllocOp::create(b, loc, kType);
        vBuf[slot] = memref::AllocOp::create(b, loc, kType);
      }
    };

    const RankPlan &rp = plan.rankPlans[rank];
    auto rows = [&](Value x, const RingPiece &piece) -> Value {
      auto type = cast<MemRefType>(x.getType());
      if (piece.offset == 0 && piece.rows == type.getDimSize(dims::kRows))
        return x;
      SmallVector<int64_t> offsets(type.getRank(), 0), sizes(type.getShape()),
          strides(type.getRank(), 1);
      offsets[dims::kRows] = piece.offset;
      sizes[dims::kRows] = piece.rows;
      return memref::SubViewOp::create(b, loc, x, offsets, sizes, strides);
    };
    int exchanges = 0;
    for (const RingStep &step : rp.steps) {
      Value keys = k, values = v;
      if (step.sendTo >= 0 || step.recvFrom >= 0) {
        int slot = exchanges++ % 2;
        buffer(slot);
        RingExchangeOp::create(
            b, loc, k, v, kBuf[slot], vBuf[slot],
            b.getI64IntegerAttr(step.step), b.getI64IntegerAttr(step.sendTo),
            b.getI64IntegerAttr(step.recvFrom),
            rowSetsAttr(b, step.sendRows), rowSetsAttr(b, step.recvRows));
        ++numExchanges;
        if (step.step > 0) {
          keys = kBuf[slot];
          values = vBuf[slot];
        }
      }
      for (const RingUpdate &u : step.updates) {
        const RingPiece &qp = rp.qPieces[u.qPiece];
        const RingPiece &kp = rp.kvPieces[u.kPiece];
        ComponentAttr comp = plan.kernels[u.kernel];
        auto index = [&](int64_t v) -> Value {
          return arith::ConstantIndexOp::create(b, loc, v);
        };
        SmallVector<Value> origins{index(u.qOrigin), index(u.kOrigin)};
        // Striped: lengths and filters see positions rank + N * index.
        if (u.stride != 1)
          origins.append({index(u.qPos), index(u.kPos), index(u.stride)});
        ComponentOp::create(
            b, loc, TypeRange{}, rows(q, qp), rows(keys, kp),
            rows(values, kp),
            comp.getUseLengths() || comp.hasFilters() ? lengths : Value(),
            /*key_bias=*/Value(), /*key_ids=*/Value(), rows(acc, qp), rows(max, qp), rows(sum, qp), origins, comp,
            first.getScaleAttr());
        ++numUpdates;
      }
    }
    Value out = local(fin.getOutput());
    Value lse = fin.getLse() ? local(fin.getLse()) : Value();
    FinalizeOp::create(b, loc, TypeRange{}, acc, max, sum, out, lse);
    for (Value buf : {acc, max, sum, kBuf[0], vBuf[0], kBuf[1], vBuf[1]})
      if (buf)
        memref::DeallocOp::create(b, loc, buf);
    func::ReturnOp::create(b, loc);
  }
};
} // namespace
