//===- Bufferize.cpp - decomposed attention from tensors to memrefs -------===//
//
// attn-bufferize: a small, purpose-built bufferization. The decomposed form
// has a fixed shape (state init, components, finalize on fresh tensors), so
// each function is rebuilt on memrefs: tensor arguments become memrefs, the
// results become trailing output memrefs that finalize writes in place, and
// the state tensors become allocations freed before returning. A backward
// pass (grad_init, component_grad...) accumulates its gradients straight into
// the output memrefs; its delta is an allocation.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/Transforms/Passes.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/IRMapping.h"
#include "llvm/ADT/TypeSwitch.h"

namespace mlir::attn {
#define GEN_PASS_DEF_ATTNBUFFERIZE
#include "attn/Dialect/Attn/Transforms/Passes.h.inc"
} // namespace mlir::attn

using namespace mlir;
using namespace mlir::attn;

static Type toMemRef(Type t) {
  if (auto tensor = dyn_cast<RankedTensorType>(t))
    return MemRefType::get(tensor.getShape(), tensor.getElementType());
  return t;
}

namespace {
struct AttnBufferizePass
    : public mlir::attn::impl::AttnBufferizeBase<AttnBufferizePass> {
  void runOnOperation() override {
    SmallVector<func::FuncOp> funcs;
    getOperation().walk([&](func::FuncOp f) {
      // Functions already on memrefs (init_state without results) are done.
      if (f.isExternal())
        return;
      auto inits = f.getBody().getOps<InitStateOp>();
      auto gradInits = f.getBody().getOps<GradInitOp>();
      if ((!inits.empty() && (*inits.begin()).getNumResults() != 0) ||
          (!gradInits.empty() && (*gradInits.begin()).getNumResults() != 0))
        funcs.push_back(f);
    });
    for (func::FuncOp f : funcs)
      if (failed(bufferize(f)))
        return signalPassFailure();
  }

  LogicalResult bufferize(func::FuncOp oldFunc) {
    if (!oldFunc.getBody().hasOneBlock())
      return oldFunc.emitError("attn-bufferize expects a single-block function");
    FunctionType oldType = oldFunc.getFunctionType();
    SmallVector<Type> inputs;
    for (Type t : oldType.getInputs())
      inputs.push_back(toMemRef(t));
    for (Type t : oldType.getResults())
      inputs.push_back(toMemRef(t));

    OpBuilder b(oldFunc);
    auto newFunc = func::FuncOp::create(b, oldFunc.getLoc(), oldFunc.getName(),
                                        b.getFunctionType(inputs, {}));
    newFunc->setAttrs(oldFunc->getAttrs());
    newFunc.setFunctionType(b.getFunctionType(inputs, {}));
    Block *entry = newFunc.addEntryBlock();
    Block &oldBody = oldFunc.getBody().front();

    IRMapping map;
    for (auto [oldArg, newArg] :
         llvm::zip(oldBody.getArguments(), entry->getArguments()))
      map.map(oldArg, newArg);

    // Finalize results that the function returns are written in place into
    // the matching output argument; so are returned gradients, from the
    // grad_init that starts them (component_grads update them in place).
    auto returnOp = cast<func::ReturnOp>(oldBody.getTerminator());
    DenseMap<Value, Value> resultToOutput;
    for (auto [index, returned] : llvm::enumerate(returnOp.getOperands())) {
      Value origin = returned;
      while (auto c = origin.getDefiningOp<ComponentGradOp>()) {
        unsigned n = cast<OpResult>(origin).getResultNumber();
        SmallVector<Value> grads{c.getDq(), c.getDk(), c.getDv()};
        origin = grads[n];
      }
      auto init = origin.getDefiningOp<GradInitOp>();
      if (!returned.getDefiningOp<FinalizeOp>() &&
          !(init && cast<OpResult>(origin).getResultNumber() != 0))
        return returnOp.emitError("attn-bufferize: result ")
               << index
               << " is not produced by attn.finalize or a gradient chain";
      resultToOutput[origin] =
          entry->getArgument(oldType.getNumInputs() + index);
    }

    b.setInsertionPointToStart(entry);
    SmallVector<Value> allocations;
    // Every destination gets its own buffer, even where CSE merged the
    // tensor.empty ops that feed several destinations.
    auto destination = [&](Value tensor, Value result) -> Value {
      if (Value out = result ? resultToOutput.lookup(result) : Value())
        return out;
      auto empty = tensor.getDefiningOp<tensor::EmptyOp>();
      if (!empty)
        return Value();
      SmallVector<Value> sizes;
      for (Value size : empty.getDynamicSizes())
        sizes.push_back(map.lookup(size));
      auto alloc = memref::AllocOp::create(
          b, empty.getLoc(), cast<MemRefType>(toMemRef(empty.getType())),
          sizes);
      allocations.push_back(alloc);
      return alloc;
    };
    for (Operation &op : oldBody.without_terminator()) {
      Location loc = op.getLoc();
      LogicalResult ok = success();
      llvm::TypeSwitch<Operation *>(&op)
          .Case([&](tensor::EmptyOp) {
            // Materialised per destination, see `destination`.
          })
          .Case([&](tensor::DimOp d) {
            map.map(d.getResult(),
                    memref::DimOp::create(b, loc, map.lookup(d.getSource()),
                                          map.lookup(d.getIndex())));
          })
          .Case([&](InitStateOp s) {
            SmallVector<Value> dests;
            for (Value t : {s.getAcc(), s.getMax(), s.getSum()})
              dests.push_back(destination(t, Value()));
            if (llvm::is_contained(dests, Value())) {
              ok = s.emitError("attn-bufferize: the state must start from "
                               "tensor.empty");
              return;
            }
            InitStateOp::create(b, loc, TypeRange{}, dests[0], dests[1],
                                dests[2]);
            map.map(s.getResults(), dests);
          })
          .Case([&](ComponentOp c) {
            Value lengths = c.getLengths() ? map.lookup(c.getLengths()) : Value();
            Value bias = c.getKeyBias() ? map.lookup(c.getKeyBias()) : Value();
            Value ids = c.getKeyIds() ? map.lookup(c.getKeyIds()) : Value();
            auto nc = ComponentOp::create(
                b, loc, TypeRange{}, map.lookup(c.getQuery()),
                map.lookup(c.getKey()), map.lookup(c.getValue()), lengths, bias, ids,
                map.lookup(c.getAcc()), map.lookup(c.getMax()),
                map.lookup(c.getSum()),
                llvm::map_to_vector(c.getOrigins(),
                                    [&](Value o) { return map.lookupOrDefault(o); }),
                c.getComponent(), c.getScaleAttr());
            map.map(c.getResults(),
                    ValueRange{nc.getAcc(), nc.getMax(), nc.getSum()});
          })
          .Case([&](GradInitOp g) {
            SmallVector<Value> tensors{g.getDelta(), g.getDq(), g.getDk(),
                                       g.getDv()};
            SmallVector<Value> dests;
            for (auto [t, result] : llvm::zip(tensors, g.getResults()))
              dests.push_back(destination(t, result));
            if (llvm::is_contained(dests, Value())) {
              ok = g.emitError("attn-bufferize: grad_init must write into "
                               "tensor.empty or returned gradients");
              return;
            }
            GradInitOp::create(b, loc, TypeRange{}, map.lookup(g.getOutput()),
                               map.lookup(g.getGradOutput()), dests[0],
                               dests[1], dests[2], dests[3]);
            map.map(g.getResults(), dests);
          })
          .Case([&](ComponentGradOp c) {
            auto lookup = [&](Value v) { return v ? map.lookup(v) : Value(); };
            auto nc = ComponentGradOp::create(
                b, loc, TypeRange{}, lookup(c.getQuery()), lookup(c.getKey()),
                lookup(c.getValue()), lookup(c.getGradOutput()),
                lookup(c.getLse()), lookup(c.getDelta()),
                lookup(c.getLengths()), lookup(c.getKeyBias()),
                lookup(c.getDq()), lookup(c.getDk()), lookup(c.getDv()),
                llvm::map_to_vector(c.getOrigins(),
                                    [&](Value o) { return map.lookupOrDefault(o); }),
                c.getComponent(), c.getScaleAttr());
            map.map(c.getResults(), ValueRange{nc.getDq(), nc.getDk(), nc.getDv()});
          })
          .Case([&](FinalizeOp f) {
            SmallVector<Value> dests{destination(f.getOutput(), f.getResult(0))};
            if (f.getLse())
              dests.push_back(destination(f.getLse(), f.getResult(1)));
            if (llvm::is_contained(dests, Value())) {
              ok = f.emitError("attn-bufferize: finalize must write into "
                               "tensor.empty");
              return;
            }
            FinalizeOp::create(b, loc, TypeRange{}, map.lookup(f.getAcc()),
                               map.lookup(f.getMax()), map.lookup(f.getSum()),
                               dests[0], f.getLse() ? dests[1] : Value());
            map.map(f.getResults(), dests);
          })
          .Default([&](Operation *other) {
            bool hasTensor = llvm::any_of(other->getResultTypes(), [](Type t) {
              return isa<TensorType>(t);
            }) || llvm::any_of(other->getOperandTypes(), [](Type t) {
              return isa<TensorType>(t);
            });
            if (hasTensor) {
              ok = other->emitError("attn-bufferize cannot bufferize this op");
              return;
            }
            b.clone(*other, map);
          });
      if (failed(ok)) {
        newFunc.erase();
        return failure();
      }
    }
    for (Value alloc : allocations)
      memref::DeallocOp::create(b, returnOp.getLoc(), alloc);
    func::ReturnOp::create(b, returnOp.getLoc());
    oldFunc.erase();
    return success();
  }
};
} // namespace
