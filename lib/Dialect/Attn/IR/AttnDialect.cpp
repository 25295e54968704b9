//===- AttnDialect.cpp - attn dialect, attributes and verifiers -----------===//
//
// Registers the attn dialect and implements the rules every pattern attribute
// and operation must satisfy: positive windows, rates that divide segments,
// shapes that agree (grouped-query heads, equal head dims), and the
// tensor/memref forms of the destination-style state operations.
//
//===----------------------------------------------------------------------===//

#include "attn/Dialect/Attn/IR/AttnDialect.h"
#include "attn/Dialect/Attn/IR/AttnDims.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/DialectImplementation.h"
#include "mlir/IR/OpImplementation.h"
#include "llvm/ADT/TypeSwitch.h"

#include <cmath>

using namespace mlir;
using namespace mlir::attn;

#include "attn/Dialect/Attn/IR/AttnOpsDialect.cpp.inc"
#include "attn/Dialect/Attn/IR/AttnAttrInterfaces.cpp.inc"

#define GET_ATTRDEF_CLASSES
#include "attn/Dialect/Attn/IR/AttnAttrs.cpp.inc"

#define GET_OP_CLASSES
#include "attn/Dialect/Attn/IR/AttnOps.cpp.inc"

void AttnDialect::initialize() {
  addAttributes<
#define GET_ATTRDEF_LIST
#include "attn/Dialect/Attn/IR/AttnAttrs.cpp.inc"
      >();
  addOperations<
#define GET_OP_LIST
#include "attn/Dialect/Attn/IR/AttnOps.cpp.inc"
      >();
}

//===----------------------------------------------------------------------===//
// Pattern attributes
//===----------------------------------------------------------------------===//

bool FullAttr::usesLengths() const { return false; }
bool CausalAttr::usesLengths() const { return false; }
bool LocalAttr::usesLengths() const { return false; }
bool StridedAttr::usesLengths() const { return false; }
bool DilatedAttr::usesLengths() const { return false; }
bool TokenizedAttr::usesLengths() const { return true; }

static bool anyUsesLengths(ArrayAttr patterns) {
  return llvm::any_of(patterns, [](Attribute a) {
    return cast<PatternAttrInterface>(a).usesLengths();
  });
}
bool SumAttr::usesLengths() const { return anyUsesLengths(getPatterns()); }
bool UnionAttr::usesLengths() const { return anyUsesLengths(getPatterns()); }
bool IntersectAttr::usesLengths() const {
  return anyUsesLengths(getPatterns());
}

LogicalResult LocalAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                                int64_t window, bool) {
  if (window < 1)
    return emitError() << "local window must be >= 1, got " << window;
  return success();
}

LogicalResult StridedAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                                  int64_t stride, int64_t local) {
  if (stride < 1)
    return emitError() << "strided stride must be >= 1, got " << stride;
  if (local < 1)
    return emitError() << "strided local must be >= 1, got " << local;
  return success();
}

LogicalResult DilatedAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                                  int64_t segment, int64_t rate, bool, bool) {
  if (segment < 1)
    return emitError() << "dilated segment must be >= 1, got " << segment;
  if (rate < 1)
    return emitError() << "dilated rate must be >= 1, got " << rate;
  if (segment % rate != 0)
    return emitError() << "dilated rate " << rate
                       << " does not divide segment " << segment;
  return success();
}

static LogicalResult
verifyCombinator(function_ref<InFlightDiagnostic()> emitError, StringRef name,
                 ArrayAttr patterns) {
  if (patterns.empty())
    return emitError() << name << " needs at least one pattern";
  for (auto [index, pattern] : llvm::enumerate(patterns))
    if (!isa<PatternAttrInterface>(pattern))
      return emitError() << name << " member " << index
                         << " is not a pattern: " << pattern;
  return success();
}

LogicalResult SumAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                              ArrayAttr patterns) {
  return verifyCombinator(emitError, "sum", patterns);
}
LogicalResult UnionAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                                ArrayAttr patterns) {
  return verifyCombinator(emitError, "union", patterns);
}
LogicalResult
IntersectAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                      ArrayAttr patterns) {
  return verifyCombinator(emitError, "intersect", patterns);
}

//===----------------------------------------------------------------------===//
// ComponentAttr: custom syntax
//   #attn.component<period = P, residue = all|head|head(M, o, d)|N, segment = S,
//                   band = [lo, hi], lengths = true, include = [...],
//                   exclude = [...]>
// with lo/hi `-inf`/`inf` for no bound; lengths/include/exclude optional.
//===----------------------------------------------------------------------===//

LogicalResult
ComponentAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                      int64_t period, int64_t residue, int64_t segment,
                      int64_t bandLo, int64_t bandHi, bool, ArrayAttr include,
                      ArrayAttr exclude, int64_t headMod, int64_t headOffset,
                      int64_t headDiv) {
  if (period < 1)
    return emitError() << "component period must be >= 1, got " << period;
  if (residue == kHeadResidue && (headMod < 1 || headOffset < 0 || headDiv < 1))
    return emitError() << "component head residue (" << headMod << ", "
                       << headOffset << ", " << headDiv
                       << ") needs modulus >= 1, offset >= 0, divisor >= 1";
  if (residue != kAllResidues && residue != kHeadResidue &&
      (residue < 0 || residue >= period))
    return emitError() << "component residue " << residue
                       << " is not in [0, " << period << ")";
  if (segment < 0 || (segment > 0 && segment % period != 0))
    return emitError() << "component segment " << segment
                       << " must be 0 or a multiple of period " << period;
  if (bandLo != kNegInf && bandHi != kPosInf && bandLo > bandHi)
    return emitError() << "component band [" << bandLo << ", " << bandHi
                       << "] is empty";
  if (!include.empty() && failed(verifyCombinator(emitError, "include", include)))
    return failure();
  if (!exclude.empty() && failed(verifyCombinator(emitError, "exclude", exclude)))
    return failure();
  return success();
}

static ParseResult parseBound(AsmParser &parser, int64_t &value, bool lower) {
  if (succeeded(parser.parseOptionalMinus())) {
    if (succeeded(parser.parseOptionalKeyword("inf"))) {
      if (!lower)
        return parser.emitError(parser.getCurrentLocation(),
                                "upper band bound cannot be -inf");
      value = ComponentAttr::kNegInf;
      return success();
    }
    if (parser.parseInteger(value))
      return failure();
    value = -value;
    return success();
  }
  if (succeeded(parser.parseOptionalKeyword("inf"))) {
    if (lower)
      return parser.emitError(parser.getCurrentLocation(),
                              "lower band bound cannot be inf");
    value = ComponentAttr::kPosInf;
    return success();
  }
  return parser.parseInteger(value);
}

static void printBound(AsmPrinter &printer, int64_t value) {
  if (value == ComponentAttr::kNegInf)
    printer << "-inf";
  else if (value == ComponentAttr::kPosInf)
    printer << "inf";
  else
    printer << value;
}

Attribute ComponentAttr::parse(AsmParser &parser, Type) {
  MLIRContext *ctx = parser.getContext();
  int64_t period = 1, residue = kAllResidues, segment = 0;
  int64_t lo = kNegInf, hi = kPosInf;
  bool lengths = false;
  ArrayAttr include = ArrayAttr::get(ctx, {}), exclude = include;
  // head(M, o, d); a plain `head` takes M = period once the period is known.
  int64_t headMod = 0, headOffset = 0, headDiv = 1;
  if (parser.parseLess())
    return {};
  auto parseField = [&]() -> ParseResult {
    StringRef key;
    SMLoc loc = parser.getCurrentLocation();
    if (parser.parseKeyword(&key) || parser.parseEqual())
      return failure();
    if (key == "period")
      return parser.parseInteger(period);
    if (key == "segment")
      return parser.parseInteger(segment);
    if (key == "residue") {
      if (succeeded(parser.parseOptionalKeyword("all"))) {
        residue = kAllResidues;
        return success();
      }
      if (succeeded(parser.parseOptionalKeyword("head"))) {
        residue = kHeadResidue;
        if (failed(parser.parseOptionalLParen()))
          return success();
        return failure(parser.parseInteger(headMod) || parser.parseComma() ||
                       parser.parseInteger(headOffset) ||
                       parser.parseComma() || parser.parseInteger(headDiv) ||
                       parser.parseRParen());
      }
      return parser.parseInteger(residue);
    }
    if (key == "band")
      return failure(parser.parseLSquare() || parseBound(parser, lo, true) ||
                     parser.parseComma() || parseBound(parser, hi, false) ||
                     parser.parseRSquare());
    if (key == "lengths") {
      if (succeeded(parser.parseOptionalKeyword("true")))
        lengths = true;
      else if (parser.parseKeyword("false"))
        return failure();
      return success();
    }
    if (key == "include")
      return parser.parseAttribute(include);
    if (key == "exclude")
      return parser.parseAttribute(exclude);
    return parser.emitError(loc, "unknown component field '") << key << "'";
  };
  if (parser.parseCommaSeparatedList(parseField) || parser.parseGreater())
    return {};
  if (residue == kHeadResidue && headMod == 0)
    headMod = period;
  return getChecked([&] { return parser.emitError(parser.getNameLoc()); },
                    ctx, period, residue, segment, lo, hi, lengths, include,
                    exclude, headMod, headOffset, headDiv);
}

int64_t ComponentAttr::classOfHead(int64_t h) const {
  if (getResidue() != kHeadResidue)
    return getResidue();
  const int64_t x = h % getHeadMod() - getHeadOffset();
  if (x < 0 || x % getHeadDiv() != 0 || x / getHeadDiv() >= getPeriod())
    return -1;
  return x / getHeadDiv();
}

void ComponentAttr::print(AsmPrinter &printer) const {
  printer << "<period = " << getPeriod() << ", residue = ";
  if (getResidue() == kAllResidues)
    printer << "all";
  else if (isPlainHeadResidue())
    printer << "head";
  else if (getResidue() == kHeadResidue)
    printer << "head(" << getHeadMod() << ", " << getHeadOffset() << ", "
            << getHeadDiv() << ")";
  else
    printer << getResidue();
  printer << ", segment = " << getSegment() << ", band = [";
  printBound(printer, getBandLo());
  printer << ", ";
  printBound(printer, getBandHi());
  printer << "]";
  if (getUseLengths())
    printer << ", lengths = true";
  if (!getInclude().empty())
    printer << ", include = " << getInclude();
  if (!getExclude().empty())
    printer << ", exclude = " << getExclude();
  printer << ">";
}

//===----------------------------------------------------------------------===//
// AttentionOp
//===----------------------------------------------------------------------===//

/// The `scale` attribute, or 1/sqrt(head_dim) of `query`.
static double effectiveScale(FloatAttr scale, RankedTensorType query) {
  if (scale)
    return scale.getValueAsDouble();
  int64_t d = query.getDimSize(dims::kHeadDim);
  return ShapedType::isDynamic(d) ? 1.0 : 1.0 / std::sqrt(double(d));
}

double AttentionOp::getEffectiveScale() {
  return effectiveScale(getScaleAttr(), getQuery().getType());
}

/// Checks that `a` and `b` agree in dimension `dim` when both are static.
static LogicalResult checkDim(Operation *op, ShapedType a, StringRef aName,
                              unsigned aDim, ShapedType b, StringRef bName,
                              unsigned bDim, StringRef what) {
  int64_t x = a.getDimSize(aDim), y = b.getDimSize(bDim);
  if (!ShapedType::isDynamic(x) && !ShapedType::isDynamic(y) && x != y)
    return op->emitOpError() << what << " of " << aName << " (" << x
                             << ") and " << bName << " (" << y << ") differ";
  return success();
}

/// The checks attn.attention and attn.attention_grad share: q, k and v of
/// rank 4 with one element type and agreeing sizes, the lengths that the
/// pattern needs, key_ids and key_bias shapes and a positive scale.
static LogicalResult verifyAttentionInputs(Operation *op, RankedTensorType q,
                                           RankedTensorType k,
                                           RankedTensorType v, Value lengths,
                                           Value keyBias, Value keyIds,
                                           Attribute patternAttr,
                                           FloatAttr scale) {
  auto emitOpError = [&]() { return op->emitOpError(); };
  for (auto [name, type] : {std::pair<StringRef, RankedTensorType>{"query", q},
                            {"key", k},
                            {"value", v}})
    if (type.getRank() != dims::kTensorRank)
      return emitOpError() << name << " must have rank 4 [B, H, L, D], got "
                           << type;
  if (k.getElementType() != q.getElementType() ||
      v.getElementType() != q.getElementType())
    return emitOpError() << "query, key and value must have one element type";
  if (q.getDimSize(dims::kHeadDim) == 0)
    return emitOpError() << "head dim must be >= 1";
  if (failed(checkDim(op, k, "key", dims::kBatch, v, "value", dims::kBatch,
                      "batch sizes")) ||
      failed(checkDim(op, q, "query", dims::kHeadDim, k, "key",
                      dims::kHeadDim, "head dims")) ||
      failed(checkDim(op, k, "key", dims::kHeadDim, v, "value",
                      dims::kHeadDim, "head dims")) ||
      failed(checkDim(op, k, "key", dims::kHeads, v, "value", dims::kHeads,
                      "head counts")) ||
      failed(checkDim(op, k, "key", dims::kRows, v, "value", dims::kRows,
                      keyIds ? "table rows" : "sequence lengths")))
    return failure();
  int64_t h = q.getDimSize(dims::kHeads), hkv = k.getDimSize(dims::kHeads);
  if (!ShapedType::isDynamic(h) && !ShapedType::isDynamic(hkv) &&
      (hkv == 0 || h % hkv != 0))
    return emitOpError() << "key/value heads (" << hkv
                         << ") must divide query heads (" << h << ")";

  auto pattern = cast<PatternAttrInterface>(patternAttr);
  if (pattern.usesLengths() && !lengths)
    return emitOpError() << "pattern " << patternAttr
                         << " needs the 'lengths' operand";
  if (!pattern.usesLengths() && lengths)
    return emitOpError() << "'lengths' given but pattern " << patternAttr
                         << " has no tokenized part";
  if (lengths) {
    auto lt = cast<RankedTensorType>(lengths.getType());
    if (lt.getRank() != 1)
      return emitOpError() << "lengths must have rank 1 [B], got " << lt;
    if (failed(checkDim(op, q, "query", dims::kBatch, lt, "lengths", 0,
                        "batch sizes")))
      return failure();
  }
  // The keys: rows of `key`, or with key_ids the ids' columns (key and value
  // are then tables [1, Hkv, V, D] read at the ids).
  ShapedType keysType = k;
  unsigned keysDim = dims::kRows;
  StringRef keysName = "key";
  if (keyIds) {
    auto it = cast<RankedTensorType>(keyIds.getType());
    if (it.getRank() != 2)
      return emitOpError() << "key_ids must have rank 2 [B, Lk], got " << it;
    if (failed(checkDim(op, q, "query", dims::kBatch, it, "key_ids", 0,
                        "batch sizes")))
      return failure();
    if (k.getDimSize(dims::kBatch) != 1)
      return emitOpError() << "with key_ids, key and value are embedding "
                              "tables [1, Hkv, V, D]; got key "
                           << k;
    keysType = it;
    keysDim = 1;
    keysName = "key_ids";
  } else if (failed(checkDim(op, q, "query", dims::kBatch, k, "key",
                             dims::kBatch, "batch sizes"))) {
    return failure();
  }
  if (keyBias) {
    auto bt = cast<RankedTensorType>(keyBias.getType());
    if (bt.getRank() != 2)
      return emitOpError() << "key_bias must have rank 2 [B, Lk], got " << bt;
    if (failed(checkDim(op, q, "query", dims::kBatch, bt, "key_bias", 0,
                        "batch sizes")) ||
        failed(checkDim(op, keysType, keysName, keysDim, bt, "key_bias", 1,
                        "key counts")))
      return failure();
  }
  if (scale && !(scale.getValueAsDouble() > 0.0))
    return emitOpError() << "scale must be > 0, got " << scale.getValueAsDouble();

  return success();
}

LogicalResult AttentionOp::verify() {
  auto q = getQuery().getType();
  if (failed(verifyAttentionInputs(*this, q, getKey().getType(),
                                   getValue().getType(), getLengths(),
                                   getKeyBias(), getKeyIds(), getPattern(),
                                   getScaleAttr())))
    return failure();
  auto out = getOutput().getType();
  if (out.getShape() != q.getShape() ||
      out.getElementType() != q.getElementType())
    return emitOpError() << "output type " << out
                         << " must equal the query type " << q;
  if (auto lse = getLse()) {
    auto lt = cast<RankedTensorType>(lse.getType());
    if (lt.getShape() != q.getShape().drop_back())
      return emitOpError() << "lse type " << lt << " must be [B, H, Lq] of "
                           << q;
  }
  return success();
}

//===----------------------------------------------------------------------===//
// Destination-style state operations
//===----------------------------------------------------------------------===//

/// The state ops either take tensors and return the updated destinations, or
/// take memrefs and return nothing.
static LogicalResult verifyDestinationStyle(Operation *op,
                                            ValueRange destinations) {
  bool tensors = llvm::all_of(destinations, [](Value v) {
    return isa<RankedTensorType>(v.getType());
  });
  bool memrefs = llvm::all_of(destinations, [](Value v) {
    return isa<MemRefType>(v.getType());
  });
  if (!tensors && !memrefs)
    return op->emitOpError("destinations must be all tensors or all memrefs");
  if (memrefs && op->getNumResults() != 0)
    return op->emitOpError("on memrefs the op has no results");
  if (tensors) {
    if (op->getNumResults() != destinations.size())
      return op->emitOpError() << "on tensors the op returns its "
                               << destinations.size() << " destinations";
    for (auto [dest, result] : llvm::zip(destinations, op->getResults()))
      if (dest.getType() != result.getType())
        return op->emitOpError() << "result type " << result.getType()
                                 << " differs from destination type "
                                 << dest.getType();
  }
  return success();
}

static LogicalResult verifyStateShapes(Operation *op, Value acc, Value max,
                                       Value sum) {
  auto a = cast<ShapedType>(acc.getType());
  auto m = cast<ShapedType>(max.getType());
  auto s = cast<ShapedType>(sum.getType());
  if (a.getRank() != dims::kTensorRank || m.getRank() != dims::kRowStateRank ||
      s.getRank() != dims::kRowStateRank)
    return op->emitOpError("state must be acc [B,H,Lq,D], max and sum [B,H,Lq]");
  if (!a.getElementType().isF32() || !m.getElementType().isF32() ||
      !s.getElementType().isF32())
    return op->emitOpError("state must be f32");
  return success();
}

LogicalResult InitStateOp::verify() {
  if (failed(verifyStateShapes(*this, getAcc(), getMax(), getSum())))
    return failure();
  return verifyDestinationStyle(*this, {getAcc(), getMax(), getSum()});
}

/// What attn.component and attn.component_grad check alike: the lengths the
/// component reads, a positive scale and 0, 2 or 5 origins.
static LogicalResult verifyComponentOperands(Operation *op, ComponentAttr c,
                                             Value lengths, FloatAttr scale,
                                             size_t numOrigins) {
  bool filtersUseLengths =
      anyUsesLengths(c.getInclude()) || anyUsesLengths(c.getExclude());
  if ((c.getUseLengths() || filtersUseLengths) && !lengths)
    return op->emitOpError("component reads lengths but none are given");
  if (!(scale.getValueAsDouble() > 0.0))
    return op->emitOpError("scale must be > 0");
  if (numOrigins != 0 && numOrigins != 2 && numOrigins != 5)
    return op->emitOpError("origins are (query origin, key origin) or (query "
                           "origin, key origin, query position, key position, "
                           "stride), got ")
           << numOrigins << " values";
  return success();
}

LogicalResult ComponentOp::verify() {
  if (failed(verifyStateShapes(*this, getAcc(), getMax(), getSum())) ||
      failed(verifyComponentOperands(*this, getComponent(), getLengths(),
                                     getScaleAttr(), getOrigins().size())))
    return failure();
  return verifyDestinationStyle(*this, {getAcc(), getMax(), getSum()});
}

LogicalResult FinalizeOp::verify() {
  if (failed(verifyStateShapes(*this, getAcc(), getMax(), getSum())))
    return failure();
  SmallVector<Value> destinations{getOutput()};
  if (getLse())
    destinations.push_back(getLse());
  return verifyDestinationStyle(*this, destinations);
}

//===----------------------------------------------------------------------===//
// The backward pass
//===----------------------------------------------------------------------===//

double AttentionGradOp::getEffectiveScale() {
  return effectiveScale(getScaleAttr(), getQuery().getType());
}

/// `what`'s type must be `expected` (the gradient of an input, or the
/// forward's output like the query).
static LogicalResult checkSameType(Operation *op, Type actual, Type expected,
                                   StringRef what, StringRef like) {
  if (actual != expected)
    return op->emitOpError() << what << " type " << actual << " must equal the "
                             << like << " type " << expected;
  return success();
}

LogicalResult AttentionGradOp::verify() {
  auto q = getQuery().getType(), k = getKey().getType(),
       v = getValue().getType();
  if (failed(verifyAttentionInputs(*this, q, k, v, getLengths(), getKeyBias(),
                                   /*keyIds=*/Value(), getPattern(),
                                   getScaleAttr())) ||
      failed(checkSameType(*this, getOutput().getType(), q, "output", "query")) ||
      failed(checkSameType(*this, getGradOutput().getType(), q, "grad_output",
                           "query")) ||
      failed(checkSameType(*this, getGradQuery().getType(), q, "grad_query",
                           "query")) ||
      failed(checkSameType(*this, getGradKey().getType(), k, "grad_key", "key")) ||
      failed(checkSameType(*this, getGradValue().getType(), v, "grad_value",
                           "value")))
    return failure();
  auto lse = getLse().getType();
  if (lse.getShape() != q.getShape().drop_back())
    return emitOpError() << "lse type " << lse << " must be [B, H, Lq] of " << q;
  return success();
}

LogicalResult GradInitOp::verify() {
  auto out = cast<ShapedType>(getOutput().getType());
  auto delta = cast<ShapedType>(getDelta().getType());
  if (out.getRank() != dims::kTensorRank ||
      delta.getRank() != dims::kRowStateRank || !delta.getElementType().isF32())
    return emitOpError("output must be [B,H,Lq,D] and delta [B,H,Lq] f32");
  if (getGradOutput().getType() != getOutput().getType())
    return emitOpError("grad_output must have the output's type");
  return verifyDestinationStyle(*this, {getDelta(), getDq(), getDk(), getDv()});
}

LogicalResult ComponentGradOp::verify() {
  if (failed(verifyComponentOperands(*this, getComponent(), getLengths(),
                                     getScaleAttr(), getOrigins().size())))
    return failure();
  if (getDq().getType() != getQuery().getType() ||
      getDk().getType() != getKey().getType() ||
      getDv().getType() != getValue().getType())
    return emitOpError("dq, dk and dv must have the types of query, key and "
                       "value");
  return verifyDestinationStyle(*this, {getDq(), getDk(), getDv()});
}
