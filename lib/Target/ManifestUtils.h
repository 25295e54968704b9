//===- ManifestUtils.h - manifest.json pieces shared by the targets -*- C++ -*-===//
//
// The argument layout and component list that every package's manifest
// carries (docs/Package.md), built from the attention function's type and
// the spec's pattern.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_LIB_TARGET_MANIFESTUTILS_H
#define ATTN_LIB_TARGET_MANIFESTUTILS_H

#include "attn/Pattern/Pattern.h"
#include "attn/Spec/Spec.h"

#include "mlir/IR/BuiltinTypes.h"

#include <nlohmann/json.hpp>

namespace mlir::attn {

inline nlohmann::json manifestArg(const std::string &name,
                                  const std::string &role, ShapedType type) {
  Type e = type.getElementType();
  std::string dtype = e.isF32()           ? "f32"
                      : e.isF16()         ? "f16"
                      : e.isBF16()        ? "bf16"
                      : e.isInteger(32)   ? "i32"
                                          : "i64";
  nlohmann::json shape = nlohmann::json::array();
  for (int64_t d : type.getShape())
    shape.push_back(ShapedType::isDynamic(d) ? -1 : d);
  return {{"name", name}, {"role", role}, {"dtype", dtype}, {"shape", shape}};
}

/// q, k, v[, lengths][, key_bias][, key_ids] -> out[, lse] of the attention
/// function's type (lengths [B] and key_ids [B, Lk] are integers, the key
/// bias is f32).
inline nlohmann::json manifestArgs(FunctionType type) {
  nlohmann::json args = nlohmann::json::array();
  const char *inputNames[] = {"q", "k", "v"};
  for (auto [i, t] : llvm::enumerate(type.getInputs())) {
    auto shaped = cast<ShapedType>(t);
    const char *name = i < 3 ? inputNames[i]
                       : !shaped.getElementType().isInteger() ? "key_bias"
                       : shaped.getRank() == 1                ? "lengths"
                                                              : "key_ids";
    args.push_back(manifestArg(name, "input", shaped));
  }
  const char *outputNames[] = {"out", "lse"};
  for (auto [i, t] : llvm::enumerate(type.getResults()))
    args.push_back(manifestArg(outputNames[i], "output", cast<ShapedType>(t)));
  return args;
}

/// q, k, v, out, lse, grad_out[, lengths][, key_bias] -> dq, dk, dv of the
/// backward function's type (its first six inputs are fixed; lengths are
/// integers, the key bias f32).
inline nlohmann::json manifestBackwardArgs(FunctionType type) {
  nlohmann::json args = nlohmann::json::array();
  const char *inputNames[] = {"q", "k", "v", "out", "lse", "grad_out"};
  for (auto [i, t] : llvm::enumerate(type.getInputs())) {
    auto shaped = cast<ShapedType>(t);
    const char *name = i < 6 ? inputNames[i]
                       : shaped.getElementType().isInteger() ? "lengths"
                                                             : "key_bias";
    args.push_back(manifestArg(name, "input", shaped));
  }
  const char *outputNames[] = {"dq", "dk", "dv"};
  for (auto [i, t] : llvm::enumerate(type.getResults()))
    args.push_back(manifestArg(outputNames[i], "output", cast<ShapedType>(t)));
  return args;
}

/// The pattern's components as printed attributes.
inline nlohmann::json manifestComponents(const Spec &spec) {
  nlohmann::json components = nlohmann::json::array();
  for (ComponentAttr c : decompose(spec.pattern)) {
    std::string text;
    llvm::raw_string_ostream os(text);
    os << Attribute(c);
    components.push_back(text);
  }
  return components;
}

} // namespace mlir::attn

#endif // ATTN_LIB_TARGET_MANIFESTUTILS_H
