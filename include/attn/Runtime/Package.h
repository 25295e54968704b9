//===- Package.h - load and run compiled attention packages -----*- C++ -*-===//
//
// The runtime's C++ core (no MLIR or LLVM): reads manifest.json, loads the
// kernels of a CPU package with dlopen, checks every tensor against the
// manifest's argument layout and calls the entry point through MLIR's C
// memref-descriptor interface.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_RUNTIME_PACKAGE_H
#define ATTN_RUNTIME_PACKAGE_H

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace attn::runtime {

/// A caller-owned dense tensor.
struct Tensor {
  void *data = nullptr;
  std::vector<int64_t> shape;
  std::string dtype; ///< "f32" or "i32"
};

/// One argument of the entry point, from the manifest.
struct ArgSpec {
  std::string name, role, dtype;
  std::vector<int64_t> shape; ///< -1 = dynamic
};

class Package {
public:
  ~Package();
  /// Loads the package in `dir`; on failure returns null and sets `error`.
  static std::unique_ptr<Package> load(const std::string &dir,
                                       std::string &error);

  const std::string &target() const { return target_; }
  const std::string &name() const { return name_; }
  const std::string &specJson() const { return specJson_; }
  const std::vector<ArgSpec> &args() const { return args_; }
  bool usesLengths() const;
  bool hasLse() const;

  /// Runs on q, k, v[, lengths] -> out[, lse]. `lengths` and `lse` may be
  /// null. Returns false and sets `error` on bad arguments.
  bool run(const Tensor &q, const Tensor &k, const Tensor &v,
           const Tensor *lengths, Tensor &out, Tensor *lse, std::string &error);

private:
  Package() = default;
  std::string dir_, target_, name_, specJson_;
  std::vector<ArgSpec> args_;
  void *library_ = nullptr;
  void *entry_ = nullptr;
};

} // namespace attn::runtime

#endif // ATTN_RUNTIME_PACKAGE_H
