//===- Spec.cpp - JSON attention specs -> attn IR -------------------------===//
//
// Reads a spec with nlohmann/json, checks each field (type, range, unknown
// keys) while tracking its JSON path, and builds the pattern attributes with
// getChecked so that the dialect's own verifiers word the pattern rules.
//
//===----------------------------------------------------------------------===//

#include "attn/Spec/Spec.h"
#include "attn/Dialect/Attn/IR/AttnDialect.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/Builders.h"
#include "mlir/IR/Diagnostics.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <regex>
#include <set>

using namespace mlir;
using namespace mlir::attn;
using json = nlohmann::json;

namespace {
/// Thrown inside the parser and caught at its entry point.
struct SpecError {
  std::string path, message;
};

[[noreturn]] void fail(const std::string &path, const std::string &message) {
  throw SpecError{path, message};
}

std::string join(const std::string &path, const std::string &key) {
  return path.empty() ? key : path + "." + key;
}

void checkKeys(const json &object, const std::string &path,
               const std::set<std::string> &allowed) {
  if (!object.is_object())
    fail(path, "must be an object");
  for (auto it = object.begin(); it != object.end(); ++it) {
    if (!allowed.count(it.key())) {
      std::string expected;
      for (const std::string &a : allowed)
        expected += (expected.empty() ? "" : ", ") + a;
      fail(join(path, it.key()),
           "unknown field (expected one of: " + expected + ")");
    }
  }
}

int64_t getInt(const json &object, const std::string &path,
               const std::string &key, std::optional<int64_t> dflt,
               int64_t min) {
  std::string p = join(path, key);
  if (!object.contains(key)) {
    if (!dflt)
      fail(p, "is required");
    return *dflt;
  }
  const json &v = object.at(key);
  if (!v.is_number_integer())
    fail(p, "must be an integer, got " + v.dump());
  int64_t x = v.get<int64_t>();
  if (x < min)
    fail(p, "must be >= " + std::to_string(min) + ", got " + std::to_string(x));
  return x;
}

bool getBool(const json &object, const std::string &path,
             const std::string &key, bool dflt) {
  if (!object.contains(key))
    return dflt;
  const json &v = object.at(key);
  if (!v.is_boolean())
    fail(join(path, key), "must be true or false, got " + v.dump());
  return v.get<bool>();
}

std::string getEnum(const json &object, const std::string &path,
                    const std::string &key, const std::string &dflt,
                    const std::vector<std::string> &choices) {
  if (!object.contains(key))
    return dflt;
  const json &v = object.at(key);
  std::string list;
  for (const std::string &c : choices)
    list += (list.empty() ? "" : ", ") + c;
  if (!v.is_string())
    fail(join(path, key), "must be one of " + list + ", got " + v.dump());
  std::string s = v.get<std::string>();
  if (std::find(choices.begin(), choices.end(), s) == choices.end())
    fail(join(path, key), "must be one of " + list + ", got \"" + s + "\"");
  return s;
}

/// Builds attribute `Attr` with the dialect's verifier; its message becomes
/// the error at `path`.
template <typename Attr, typename... Args>
Attr buildChecked(MLIRContext *ctx, const std::string &path, Args... args) {
  std::string message;
  ScopedDiagnosticHandler handler(ctx, [&](Diagnostic &diag) {
    message = diag.str();
    return success();
  });
  Attr attr = Attr::getChecked(
      [&] { return mlir::emitError(UnknownLoc::get(ctx)); }, ctx, args...);
  if (!attr)
    fail(path, message);
  return attr;
}

Attribute parsePattern(const json &node, const std::string &path,
                       MLIRContext *ctx) {
  if (!node.is_object() || node.size() != 1)
    fail(path, "must be an object with exactly one key naming the pattern "
               "(full, causal, local, strided, dilated, tokenized, sum, "
               "union, intersect)");
  const std::string kind = node.begin().key();
  const json &body = node.begin().value();
  const std::string p = join(path, kind);
  if (kind == "full" || kind == "causal") {
    checkKeys(body, p, {});
    return kind == "full" ? Attribute(FullAttr::get(ctx))
                          : Attribute(CausalAttr::get(ctx));
  }
  if (kind == "local") {
    checkKeys(body, p, {"window", "causal"});
    return buildChecked<LocalAttr>(ctx, p, getInt(body, p, "window", {}, 1),
                                   getBool(body, p, "causal", true));
  }
  if (kind == "strided") {
    checkKeys(body, p, {"stride", "local"});
    int64_t stride = getInt(body, p, "stride", {}, 1);
    return buildChecked<StridedAttr>(ctx, p, stride,
                                     getInt(body, p, "local", stride, 1));
  }
  if (kind == "dilated") {
    checkKeys(body, p, {"segment", "rate", "head_offset", "causal"});
    return buildChecked<DilatedAttr>(
        ctx, p, getInt(body, p, "segment", {}, 1),
        getInt(body, p, "rate", 1, 1), getBool(body, p, "head_offset", false),
        getBool(body, p, "causal", false));
  }
  if (kind == "tokenized") {
    checkKeys(body, p, {"dedup"});
    return TokenizedAttr::get(ctx, getBool(body, p, "dedup", false));
  }
  if (kind == "sum" || kind == "union" || kind == "intersect") {
    if (!body.is_array() || body.empty())
      fail(p, "must be a non-empty array of patterns");
    SmallVector<Attribute> members;
    for (size_t i = 0; i < body.size(); ++i)
      members.push_back(
          parsePattern(body[i], p + "[" + std::to_string(i) + "]", ctx));
    ArrayAttr array = ArrayAttr::get(ctx, members);
    if (kind == "sum")
      return buildChecked<SumAttr>(ctx, p, array);
    if (kind == "union")
      return buildChecked<UnionAttr>(ctx, p, array);
    return buildChecked<IntersectAttr>(ctx, p, array);
  }
  fail(p, "unknown pattern (expected full, causal, local, strided, dilated, "
          "tokenized, sum, union or intersect)");
}

Spec parse(const json &root, MLIRContext *ctx) {
  Spec spec;
  checkKeys(root, "", {"name", "dtype", "batch", "heads", "kv_heads",
                       "head_dim", "seq_len", "q_len", "kv_len", "scale",
                       "lse", "key_bias", "key_ids", "vocab", "pattern", "target",
                       "distribution", "backward"});
  if (!root.contains("name"))
    fail("name", "is required");
  if (!root.at("name").is_string())
    fail("name", "must be a string");
  spec.name = root.at("name").get<std::string>();
  if (!std::regex_match(spec.name, std::regex("[A-Za-z_][A-Za-z0-9_]*")))
    fail("name", "must be an identifier ([A-Za-z_][A-Za-z0-9_]*), got \"" +
                     spec.name + "\"");
  spec.dtype = getEnum(root, "", "dtype", "f32", {"f32", "bf16", "f16"});
  spec.batch = getInt(root, "", "batch", 1, 1);
  spec.heads = getInt(root, "", "heads", 1, 1);
  spec.kvHeads = getInt(root, "", "kv_heads", spec.heads, 1);
  if (spec.heads % spec.kvHeads != 0)
    fail("kv_heads", std::to_string(spec.kvHeads) + " does not divide heads " +
                         std::to_string(spec.heads));
  spec.headDim = getInt(root, "", "head_dim", {}, 1);
  if (root.contains("seq_len")) {
    if (root.contains("q_len") || root.contains("kv_len"))
      fail("seq_len", "give either seq_len or q_len/kv_len, not both");
    spec.qLen = spec.kvLen = getInt(root, "", "seq_len", {}, 1);
  } else {
    if (root.contains("q_len"))
      spec.qLen = getInt(root, "", "q_len", {}, 1);
    if (root.contains("kv_len"))
      spec.kvLen = getInt(root, "", "kv_len", {}, 1);
  }
  if (root.contains("scale")) {
    const json &s = root.at("scale");
    if (!s.is_number() || !(s.get<double>() > 0.0) ||
        !std::isfinite(s.get<double>()))
      fail("scale", "must be a positive number, got " + s.dump());
    spec.scale = s.get<double>();
  }
  spec.lse = getBool(root, "", "lse", true);
  spec.keyBias = getBool(root, "", "key_bias", false);
  spec.keyIds = getBool(root, "", "key_ids", false);
  if (root.contains("vocab")) {
    if (!spec.keyIds)
      fail("vocab", "is the number of table rows and needs \"key_ids\": true");
    spec.vocab = getInt(root, "", "vocab", {}, 1);
  }
  if (!root.contains("pattern"))
    fail("pattern", "is required");
  spec.pattern = parsePattern(root.at("pattern"), "pattern", ctx);

  if (root.contains("target")) {
    const json &t = root.at("target");
    checkKeys(t, "target", {"arch", "q_tile", "kv_tile"});
    spec.target.arch =
        getEnum(t, "target", "arch", "cpu", {"cpu", "sm_90a", "sm_80"});
    spec.target.qTile = getInt(t, "target", "q_tile", 32, 1);
    spec.target.kvTile = getInt(t, "target", "kv_tile", 32, 1);
  }
  if (root.contains("distribution")) {
    const json &d = root.at("distribution");
    spec.distribution.present = true;
    checkKeys(d, "distribution", {"ranks", "layout", "kv"});
    spec.distribution.ranks = getInt(d, "distribution", "ranks", 1, 1);
    spec.distribution.layout =
        getEnum(d, "distribution", "layout", "contiguous",
                {"contiguous", "zigzag", "striped"});
    spec.distribution.kv =
        getEnum(d, "distribution", "kv", "ring", {"ring", "allgather"});
  }
  if (spec.keyBias && spec.distribution.present)
    fail("key_bias", "is not supported with a distribution section yet (the "
                     "bias of remote keys would have to travel with them)");
  if (spec.keyIds && spec.distribution.present)
    fail("key_ids", "is not supported with a distribution section (distributed "
                    "tokenized attention exchanges embeddings instead: "
                    "attn.TokenizedAttention with nranks > 1)");
  spec.backward = getBool(root, "", "backward", false);
  if (spec.backward) {
    if (spec.keyIds)
      fail("backward", "is not supported with key_ids (gradients of the "
                       "embedding tables are not computed)");
    if (!spec.lse)
      fail("backward", "needs the forward's lse: leave \"lse\" true");
  }
  spec.json = root.dump();
  return spec;
}
} // namespace

double Spec::effectiveScale() const {
  return scale ? *scale : 1.0 / std::sqrt(double(headDim));
}

std::optional<Spec> mlir::attn::parseSpec(const std::string &text,
                                          MLIRContext *ctx,
                                          std::string &error) {
  ctx->loadDialect<AttnDialect>();
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error &e) {
    // Turn the byte offset into a line and column.
    size_t offset = std::min<size_t>(e.byte ? e.byte - 1 : 0, text.size());
    size_t line = 1 + std::count(text.begin(), text.begin() + offset, '\n');
    size_t lineStart = text.rfind('\n', offset ? offset - 1 : 0);
    size_t column = offset - (lineStart == std::string::npos ? 0 : lineStart + 1) + 1;
    if (lineStart == std::string::npos || offset == 0)
      column = offset + 1;
    std::string what = e.what();
    size_t cut = what.find("syntax error");
    error = "line " + std::to_string(line) + ", column " +
            std::to_string(column) + ": invalid JSON: " +
            (cut == std::string::npos ? what : what.substr(cut));
    return std::nullopt;
  }
  try {
    return parse(root, ctx);
  } catch (const SpecError &e) {
    error = (e.path.empty() ? std::string("(root)") : e.path) + ": " + e.message;
    return std::nullopt;
  }
}

/// `func.func @<name>_backward(q, k, v, out, lse, grad_out[, lengths]
/// [, key_bias]) -> (dq, dk, dv)` with one `attn.attention_grad`, after the
/// forward function at `b`.
static void buildBackwardFunction(OpBuilder &b, Location loc, const Spec &spec,
                                  RankedTensorType qType,
                                  RankedTensorType kvType,
                                  RankedTensorType lseType, bool lengths) {
  int64_t lk = spec.kvLen.value_or(ShapedType::kDynamic);
  SmallVector<Type> inputs{qType, kvType, kvType, qType, lseType, qType};
  if (lengths)
    inputs.push_back(RankedTensorType::get({spec.batch}, b.getI32Type()));
  if (spec.keyBias)
    inputs.push_back(RankedTensorType::get({spec.batch, lk}, b.getF32Type()));
  SmallVector<Type> results{qType, kvType, kvType};
  auto func = func::FuncOp::create(b, loc, spec.name + "_backward",
                                   b.getFunctionType(inputs, results));
  Block *entry = func.addEntryBlock();
  OpBuilder::InsertionGuard guard(b);
  b.setInsertionPointToStart(entry);
  unsigned next = 6;
  Value lengthsArg = lengths ? entry->getArgument(next++) : Value();
  Value biasArg = spec.keyBias ? entry->getArgument(next++) : Value();
  auto op = AttentionGradOp::create(
      b, loc, TypeRange(results), entry->getArgument(0), entry->getArgument(1),
      entry->getArgument(2), entry->getArgument(3), entry->getArgument(4),
      entry->getArgument(5), lengthsArg, biasArg, spec.pattern,
      spec.scale ? b.getF64FloatAttr(*spec.scale) : FloatAttr());
  func::ReturnOp::create(b, loc, op->getResults());
}

OwningOpRef<ModuleOp> mlir::attn::buildAttentionModule(const Spec &spec,
                                                       MLIRContext *ctx) {
  ctx->loadDialect<AttnDialect, func::FuncDialect>();
  OpBuilder b(ctx);
  Location loc = NameLoc::get(b.getStringAttr(spec.name));
  OwningOpRef<ModuleOp> module = ModuleOp::create(loc);
  b.setInsertionPointToEnd(module->getBody());

  Type elem = spec.dtype == "f32"   ? Type(b.getF32Type())
              : spec.dtype == "f16" ? Type(b.getF16Type())
                                    : Type(b.getBF16Type());
  int64_t dyn = ShapedType::kDynamic;
  int64_t lq = spec.qLen.value_or(dyn), lk = spec.kvLen.value_or(dyn);
  auto qType = RankedTensorType::get({spec.batch, spec.heads, lq, spec.headDim}, elem);
  // With key_ids, key and value are tables [1, Hkv, vocab, D] read at the ids.
  auto kvType =
      spec.keyIds
          ? RankedTensorType::get(
                {1, spec.kvHeads, spec.vocab.value_or(dyn), spec.headDim}, elem)
          : RankedTensorType::get({spec.batch, spec.kvHeads, lk, spec.headDim},
                                  elem);
  auto lseType = RankedTensorType::get({spec.batch, spec.heads, lq}, b.getF32Type());
  bool lengths = cast<PatternAttrInterface>(spec.pattern).usesLengths();

  SmallVector<Type> inputs{qType, kvType, kvType};
  if (lengths)
    inputs.push_back(RankedTensorType::get({spec.batch}, b.getI32Type()));
  if (spec.keyBias)
    inputs.push_back(RankedTensorType::get({spec.batch, lk}, b.getF32Type()));
  if (spec.keyIds)
    inputs.push_back(RankedTensorType::get({spec.batch, lk}, b.getI32Type()));
  SmallVector<Type> results{qType};
  if (spec.lse)
    results.push_back(lseType);
  auto func = func::FuncOp::create(b, loc, spec.name,
                                   b.getFunctionType(inputs, results));
  Block *entry = func.addEntryBlock();
  b.setInsertionPointToStart(entry);
  Value lengthsArg = lengths ? entry->getArgument(3) : Value();
  unsigned next = lengths ? 4 : 3;
  Value biasArg = spec.keyBias ? entry->getArgument(next++) : Value();
  Value idsArg = spec.keyIds ? entry->getArgument(next++) : Value();
  auto op = AttentionOp::create(
      b, loc, qType, spec.lse ? Type(lseType) : Type(), entry->getArgument(0),
      entry->getArgument(1), entry->getArgument(2), lengthsArg, biasArg,
      idsArg, spec.pattern,
      spec.scale ? b.getF64FloatAttr(*spec.scale) : FloatAttr());
  func::ReturnOp::create(b, loc, op->getResults());
  if (spec.backward) {
    b.setInsertionPointAfter(func);
    buildBackwardFunction(b, loc, spec, qType, kvType, lseType, lengths);
  }

  module->getOperation()->setAttr("attn.target",
                                  b.getStringAttr(spec.target.arch));
  if (spec.distribution.present)
    module->getOperation()->setAttr(
        "attn.distribution",
        b.getDictionaryAttr(
            {b.getNamedAttr("ranks", b.getI64IntegerAttr(spec.distribution.ranks)),
             b.getNamedAttr("layout", b.getStringAttr(spec.distribution.layout)),
             b.getNamedAttr("kv", b.getStringAttr(spec.distribution.kv))}));
  return module;
}
