//===- Package.cpp - load and run compiled attention packages -------------===//
//
// A CPU package's entry point is MLIR's C interface: one pointer per memref
// argument, each to a descriptor {allocated, aligned, offset, sizes[r],
// strides[r]} laid out as 3 + 2r 64-bit words. The runtime checks every
// tensor against the manifest before building descriptors, so a kernel never
// sees a shape it was not compiled for.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/Package.h"
#include "attn/Runtime/Ring.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <dlfcn.h>
#include <fstream>
#include <sstream>
#include <tuple>

using namespace attn::runtime;
using json = nlohmann::json;

namespace {
std::string shapeString(const std::vector<int64_t> &shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") +
         (shape[i] < 0 ? std::string("?") : std::to_string(shape[i]));
  return s + "]";
}
} // namespace

// Package::Package and ~Package live in GpuPackage.cpp, where GpuModule is
// complete.

/// Reads and checks (format, version) `dir`/manifest.json into `m`.
static bool readManifest(const std::string &dir, json &m, std::string &error) {
  std::string path = dir + "/manifest.json";
  std::ifstream in(path);
  if (!in) {
    error = "cannot open " + path + " (is " + dir +
            " a package built by attn-compile -o?)";
    return false;
  }
  try {
    m = json::parse(in);
    if (m.value("format", "") != "attn-package")
      throw std::runtime_error("not an attn package manifest");
    // Version 8: GPU kernels take bh_offset after pos_stride (2), then
    // q's and k's strides (3), then out's (4), the backward kernels read q,
    // k, v, out and grad_out through them (5) and may store the gradients
    // (6), and grad_kv's grid spans the keys' segments as well as the
    // rows' (7), and grad_add adds strided runs of rows (8), and on sm_90a
    // the backward kernels take two tensor maps (9), and the forward ones
    // four (10), and every component of a package that finishes the
    // gradients takes the stored gradients and the float32 sums (11); cpu
    // packages stay at 1.
    const int want = m.value("target", "cpu") == "cpu" ? 1 : 11;
    if (m.value("version", 0) != want)
      throw std::runtime_error(
          "manifest version " + std::to_string(m.value("version", 0)) +
          " is not supported (this runtime reads " + std::to_string(want) +
          " for " + m.value("target", "cpu") +
          " packages); recompile it with this attn-compile");
  } catch (const std::exception &e) {
    error = path + ": malformed manifest: " + e.what();
    return false;
  }
  return true;
}

std::unique_ptr<Package> Package::load(const std::string &dir,
                                       std::string &error) {
  std::string manifestPath = dir + "/manifest.json";
  json m;
  if (!readManifest(dir, m, error))
    return nullptr;
  std::unique_ptr<Package> pkg(new Package());
  pkg->dir_ = dir;
  try {
    pkg->target_ = m.at("target").get<std::string>();
    pkg->name_ = m.at("name").get<std::string>();
    pkg->specJson_ = m.at("spec").dump();
    const json &kernel = m.at("kernels").at(0);
    const json &args = m.contains("args") ? m.at("args") : kernel.at("args");
    for (const json &a : args)
      pkg->args_.push_back({a.at("name").get<std::string>(),
                            a.at("role").get<std::string>(),
                            a.at("dtype").get<std::string>(),
                            a.at("shape").get<std::vector<int64_t>>()});
    if (m.contains("backward"))
      for (const json &a : m.at("backward").at("args"))
        pkg->backwardArgs_.push_back({a.at("name").get<std::string>(),
                                      a.at("role").get<std::string>(),
                                      a.at("dtype").get<std::string>(),
                                      a.at("shape").get<std::vector<int64_t>>()});
    if (pkg->isGpu()) {
      if (!pkg->loadGpu(manifestPath, &m, error))
        return nullptr;
      if (m.contains("ring") && !pkg->loadRing(&m, error))
        return nullptr;
      return pkg;
    }
    std::string libPath = dir + "/" + m.at("library").get<std::string>();
    pkg->library_ = dlopen(libPath.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!pkg->library_) {
      error = "cannot load " + libPath + ": " + dlerror();
      return nullptr;
    }
    if (m.contains("ring")) {
      if (!pkg->loadRing(&m, error))
        return nullptr;
      return pkg;
    }
    std::string symbol = kernel.at("symbol").get<std::string>();
    pkg->entry_ = dlsym(pkg->library_, symbol.c_str());
    if (!pkg->entry_) {
      error = libPath + " has no entry point " + symbol;
      return nullptr;
    }
    if (m.contains("backward")) {
      const json &grad = m.at("backward");
      std::string gradSymbol = grad.at("symbol").get<std::string>();
      pkg->backwardEntry_ = dlsym(pkg->library_, gradSymbol.c_str());
      if (!pkg->backwardEntry_) {
        error = libPath + " has no entry point " + gradSymbol;
        return nullptr;
      }
    }
  } catch (const std::exception &e) {
    error = manifestPath + ": malformed manifest: " + e.what();
    return nullptr;
  }
  return pkg;
}

bool Package::peek(const std::string &dir, std::string &target,
                   int64_t &ranks, std::string &error) {
  json m;
  if (!readManifest(dir, m, error))
    return false;
  try {
    target = m.at("target").get<std::string>();
    ranks = m.contains("ring") ? m.at("ring").at("ranks").get<int64_t>() : 0;
  } catch (const std::exception &e) {
    error = dir + "/manifest.json: malformed manifest: " + e.what();
    return false;
  }
  return true;
}

bool Package::hasArg(const std::string &name) const {
  for (const ArgSpec &a : args_)
    if (a.name == name)
      return true;
  return false;
}

bool Package::usesLengths() const { return hasArg("lengths"); }
bool Package::usesKeyBias() const { return hasArg("key_bias"); }
bool Package::usesKeyIds() const { return hasArg("key_ids"); }
bool Package::hasLse() const { return hasArg("lse"); }

bool Package::inManifestOrder(const Tensor &q, const Tensor &k,
                              const Tensor &v, const Tensor *lengths,
                              const Tensor &out, const Tensor *lse,
                              std::vector<const Tensor *> &tensors,
                              std::string &error, KeyInputs keys) const {
  for (const ArgSpec &a : args_) {
    if (a.name == "q") tensors.push_back(&q);
    else if (a.name == "k") tensors.push_back(&k);
    else if (a.name == "v") tensors.push_back(&v);
    else if (a.name == "lengths") tensors.push_back(lengths);
    else if (a.name == "key_bias") tensors.push_back(keys.bias);
    else if (a.name == "key_ids") tensors.push_back(keys.ids);
    else if (a.name == "out") tensors.push_back(&out);
    else if (a.name == "lse") tensors.push_back(lse);
    else {
      error = "manifest names an unknown argument " + a.name;
      return false;
    }
  }
  return true;
}

std::vector<int64_t>
attn::runtime::contiguousStrides(const std::vector<int64_t> &shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return strides;
}

/// Checks the strides of `t` (named `name`): the contiguous layout, or for
/// q, k and v of a GPU package (`strided`) that is not a ring package any
/// layout whose rows are contiguous and start on 16-byte boundaries (the
/// kernels move rows in 16-byte pieces, and TMA needs 16-byte strides).
static bool checkStrides(const Tensor &t, const std::string &name,
                         bool strided, bool gpu, bool ring,
                         std::string &error) {
  if (stridesOf(t) == contiguousStrides(t.shape))
    return true;
  const std::string given = name + ": strides " + shapeString(t.strides);
  if (t.strides.size() != t.shape.size()) {
    error = given + " do not match its shape " + shapeString(t.shape) +
            " (one stride per dimension)";
    return false;
  }
  if (!strided) {
    error = given + " are not contiguous " +
            shapeString(contiguousStrides(t.shape)) + "; only q, k, v and out "
            "may be strided views (pass a contiguous " + name + ")";
    return false;
  }
  if (t.strides.back() != 1) {
    error = given + ": the last dimension (D) must be contiguous (stride 1)";
    return false;
  }
  for (size_t d = 0; d + 1 < t.strides.size(); ++d)
    if (t.strides[d] < 0 || t.strides[d] % 8 != 0) {
      error = given + ": stride " + std::to_string(t.strides[d]) +
              " of dimension " + std::to_string(d) +
              " must be a non-negative multiple of 8 elements (16 bytes)";
      return false;
    }
  if (ring) {
    error = given + ": a rank's chunk must be contiguous (ring packages "
            "exchange whole chunks; pass .contiguous())";
    return false;
  }
  if (!gpu) {
    error = given + ": cpu packages take contiguous tensors (strided q, k, "
            "v and out are for GPU packages)";
    return false;
  }
  return true;
}

/// Whether no two elements of the strided tensor `t` share an address:
/// with its dimensions ordered by stride, each stride reaches past the
/// span of the dimensions inside it.
static bool elementsApart(const Tensor &t) {
  std::vector<std::pair<int64_t, int64_t>> dims; // (stride, extent)
  for (size_t d = 0; d < t.shape.size(); ++d)
    if (t.shape[d] > 1)
      dims.push_back({t.strides[d], t.shape[d]});
  std::sort(dims.begin(), dims.end());
  int64_t span = 1; // elements the inner dimensions cover
  for (auto [stride, extent] : dims) {
    if (stride < span)
      return false;
    span = stride * (extent - 1) + span;
  }
  return true;
}

bool Package::checkArguments(const Tensor &q, const Tensor &k, const Tensor &v,
                             const Tensor *lengths, const Tensor &out,
                             const Tensor *lse, std::string &error,
                             KeyInputs keys) const {
  if (usesKeyBias() != (keys.bias != nullptr)) {
    error = "package " + name_ +
            (keys.bias ? " takes no key_bias (compiled without \"key_bias\": true)"
                       : " was compiled with \"key_bias\": true: key_bias [B, Lk] "
                         "is required");
    return false;
  }
  if (usesKeyIds() != (keys.ids != nullptr)) {
    error = "package " + name_ +
            (keys.ids ? " takes no key_ids (compiled without \"key_ids\": true)"
                      : " was compiled with \"key_ids\": true: key_ids [B, Lk] "
                        "(rows of the k/v tables) are required");
    return false;
  }
  if (usesLengths() && !lengths) {
    error = "package " + name_ + " has a tokenized pattern: lengths are required";
    return false;
  }
  if (!usesLengths() && lengths) {
    error = "package " + name_ + " takes no lengths (its pattern is not tokenized)";
    return false;
  }
  std::vector<const Tensor *> tensors;
  if (!inManifestOrder(q, k, v, lengths, out, lse, tensors, error, keys))
    return false;

  // Check each tensor against the manifest, then the shapes against each
  // other: q [B,H,Lq,D], k = v [B,Hkv,Lk,D], out = q, lse [B,H,Lq].
  for (size_t i = 0; i < args_.size(); ++i) {
    const ArgSpec &a = args_[i];
    if (!tensors[i])
      continue; // lse scratch, provided by the caller of checkArguments
    const Tensor &t = *tensors[i];
    if (!t.data) {
      error = a.name + ": null data pointer";
      return false;
    }
    if (t.dtype != a.dtype) {
      error = a.name + ": dtype " + t.dtype + " but the package expects " + a.dtype;
      return false;
    }
    bool ok = t.shape.size() == a.shape.size();
    size_t bad = 0;
    for (; ok && bad < a.shape.size(); ++bad)
      ok = t.shape[bad] >= 0 &&
           (a.shape[bad] < 0 || a.shape[bad] == t.shape[bad]);
    if (!ok) {
      error = a.name + ": shape " + shapeString(t.shape) +
              " does not match the package's " + shapeString(a.shape);
      // Only the lengths (`?`) vary from call to call: say which field of
      // the spec fixed the dimension that differs.
      // (k and v may be key_ids tables [1, Hkv, V, D]: not their dim 0.)
      const size_t dim = bad - 1;
      const bool rows = a.name == "q" || a.name == "out" || a.name == "lse";
      const bool keys = a.name == "k" || a.name == "v";
      if (t.shape.size() == a.shape.size() && t.shape[dim] >= 0) {
        const char *field = dim == 0 && rows             ? "batch"
                            : dim == 1 && rows           ? "heads"
                            : dim == 1 && keys           ? "kv_heads"
                            : dim == 3 && (rows || keys) ? "head_dim"
                                                         : nullptr;
        if (field)
          error += " (the spec's \"" + std::string(field) +
                   "\" fixes dimension " + std::to_string(dim) +
                   ": compile a package for this shape)";
      }
      return false;
    }
  }
  for (size_t i = 0; i < args_.size(); ++i) {
    const std::string &name = args_[i].name;
    if (tensors[i] &&
        !checkStrides(*tensors[i], name,
                      name == "q" || name == "k" || name == "v" || name == "out",
                      isGpu(), ring_ != nullptr, error))
      return false;
  }
  if (!out.strides.empty() && !elementsApart(out)) {
    error = "out: strides " + shapeString(out.strides) + " make elements of shape " +
            shapeString(out.shape) + " overlap (out must be a view without "
            "repeated elements)";
    return false;
  }
  if (k.shape != v.shape) {
    error = "v: shape " + shapeString(v.shape) + " differs from k's " + shapeString(k.shape);
    return false;
  }
  if (stridesOf(k) != stridesOf(v)) {
    error = "v: strides " + shapeString(stridesOf(v)) + " differ from k's " +
            shapeString(stridesOf(k)) + " (k and v must share a layout)";
    return false;
  }
  if (out.shape != q.shape) {
    error = "out: shape " + shapeString(out.shape) + " differs from q's " + shapeString(q.shape);
    return false;
  }
  // The number of keys: k's rows, or with key_ids their columns (k and v
  // are then tables of V rows).
  const int64_t keyCount = keys.ids ? keys.ids->shape[1] : k.shape[2];
  if (q.shape[2] < 1 || keyCount < 1) {
    error = "q and k need at least one row (got Lq = " + std::to_string(q.shape[2]) +
            ", Lk = " + std::to_string(keyCount) + ")";
    return false;
  }
  if (keys.ids) {
    if (keys.ids->shape[0] != q.shape[0] || k.shape[0] != 1) {
      error = "key_ids: shape " + shapeString(keys.ids->shape) + " must be [B, Lk] with B = " +
              std::to_string(q.shape[0]) + ", and k/v tables [1, Hkv, V, D], got k " +
              shapeString(k.shape);
      return false;
    }
    if (!isGpu()) {
      const int32_t *ids = static_cast<const int32_t *>(keys.ids->data);
      for (int64_t i = 0, n = keys.ids->shape[0] * keyCount; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= k.shape[2]) {
          error = "key_ids[" + std::to_string(i / keyCount) + ", " +
                  std::to_string(i % keyCount) + "] = " + std::to_string(ids[i]) +
                  " is outside the table rows [0, V = " + std::to_string(k.shape[2]) + ")";
          return false;
        }
    }
  } else if (k.shape[0] != q.shape[0]) {
    error = "k: batch " + std::to_string(k.shape[0]) + " differs from q's " +
            std::to_string(q.shape[0]);
    return false;
  }
  if (keys.bias && keys.bias->shape != std::vector<int64_t>{q.shape[0], keyCount}) {
    error = "key_bias: shape " + shapeString(keys.bias->shape) +
            " must be [B, Lk] = " + shapeString({q.shape[0], keyCount});
    return false;
  }
  if (lse && lse->shape != std::vector<int64_t>{q.shape[0], q.shape[1], q.shape[2]}) {
    error = "lse: shape " + shapeString(lse->shape) + " must be [B, H, Lq] = " +
            shapeString({q.shape[0], q.shape[1], q.shape[2]});
    return false;
  }
  if (lse && !hasLse()) {
    error = "package " + name_ + " was compiled without \"lse\": true";
    return false;
  }
  if (lengths && !isGpu()) {
    // A ring package's lengths are positions in the whole sequence.
    const int64_t kLen = ring_ ? ring_->kvLen : keyCount;
    const int32_t *len = static_cast<const int32_t *>(lengths->data);
    for (int64_t b = 0; b < lengths->shape[0]; ++b)
      if (len[b] < 0 || len[b] > kLen) {
        error = "lengths[" + std::to_string(b) + "] = " + std::to_string(len[b]) +
                " is outside [0, Lk = " + std::to_string(kLen) + "]";
        return false;
      }
  }

  return true;
}

bool Package::run(const Tensor &q, const Tensor &k, const Tensor &v,
                  const Tensor *lengths, Tensor &out, Tensor *lse,
                  std::string &error, void *stream, KeyInputs keys) {
  if (ring_) {
    error = "package " + name_ + " is distributed over " +
            std::to_string(ring_->ranks) +
            " ranks: run it with attn-run --nranks, attn_package_run_ranks "
            "or Package.run_ranks";
    return false;
  }
  if (!checkArguments(q, k, v, lengths, out, lse, error, keys))
    return false;
  if (isGpu())
    return runGpu(q, k, v, lengths, out, lse, error, stream, keys);
  return runCpu(q, k, v, lengths, out, lse, error, keys);
}

bool Package::runCpu(const Tensor &q, const Tensor &k, const Tensor &v,
                     const Tensor *lengths, Tensor &out, Tensor *lse,
                     std::string &error, KeyInputs keys) {
  // The kernel always writes the LSE when it was compiled with one; give it
  // scratch space if the caller does not want it.
  std::vector<float> lseScratch;
  Tensor lseTensor;
  if (hasLse()) {
    if (lse) {
      lseTensor = *lse;
    } else {
      lseScratch.resize(q.shape.size() == 4 ? q.shape[0] * q.shape[1] * q.shape[2] : 0);
      lseTensor = {lseScratch.data(), {}, "f32"};
      if (q.shape.size() == 4)
        lseTensor.shape = {q.shape[0], q.shape[1], q.shape[2]};
    }
  }

  std::vector<const Tensor *> tensors;
  inManifestOrder(q, k, v, lengths, out, hasLse() ? &lseTensor : nullptr,
                  tensors, error, keys);
  return callEntry(entry_, tensors, error);
}

/// A C memref descriptor {allocated, aligned, offset, sizes, strides} of the
/// contiguous tensor `t`.
static std::vector<int64_t> descriptorOf(const Tensor &t) {
  size_t rank = t.shape.size();
  std::vector<int64_t> d(3 + 2 * rank);
  d[0] = d[1] = reinterpret_cast<int64_t>(t.data);
  d[2] = 0;
  int64_t stride = 1;
  for (size_t i = rank; i-- > 0;) {
    d[3 + i] = t.shape[i];
    d[3 + rank + i] = stride;
    stride *= t.shape[i];
  }
  return d;
}

bool Package::callEntry(void *entry, const std::vector<const Tensor *> &tensors,
                        std::string &error) {
  std::vector<std::vector<int64_t>> descriptors;
  for (const Tensor *t : tensors)
    descriptors.push_back(descriptorOf(*t));
  std::vector<void *> p;
  for (auto &d : descriptors)
    p.push_back(d.data());
  using P = void *;
  switch (p.size()) {
  case 4:
    reinterpret_cast<void (*)(P, P, P, P)>(entry)(p[0], p[1], p[2], p[3]);
    break;
  case 5:
    reinterpret_cast<void (*)(P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4]);
    break;
  case 6:
    reinterpret_cast<void (*)(P, P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4], p[5]);
    break;
  case 7:
    reinterpret_cast<void (*)(P, P, P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    break;
  case 8:
    reinterpret_cast<void (*)(P, P, P, P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    break;
  case 9:
    reinterpret_cast<void (*)(P, P, P, P, P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
    break;
  case 10:
    reinterpret_cast<void (*)(P, P, P, P, P, P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]);
    break;
  case 11:
    reinterpret_cast<void (*)(P, P, P, P, P, P, P, P, P, P, P)>(entry)(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]);
    break;
  default:
    error = "manifest lists " + std::to_string(p.size()) +
            " arguments; expected 4 to 11";
    return false;
  }
  return true;
}

bool Package::checkGradients(const Tensor &q, const Tensor &k,
                             const Tensor &v, const Tensor &out,
                             const Tensor &gradOut, const Tensor &dq,
                             const Tensor &dk, const Tensor &dv,
                             std::string &error) const {
  // The gradients are contiguous f32 (the manifest's dtype for them), or
  // where the package stores them (GPU packages with "stores_grads"), of
  // the input type in any layout whose rows are contiguous, as dq says;
  // grad_out is like out.
  const bool store = storesGradientsInto(q, dq);
  const std::string gradDtype = store ? q.dtype : backwardArgs_.back().dtype;
  const std::string orStored =
      storesGradients() ? " (or " + q.dtype + ", which this package stores)"
                        : "";
  const std::tuple<const char *, const Tensor *, const Tensor *, std::string>
      likes[] = {{"grad_out", &gradOut, &out, out.dtype},
                 {"dq", &dq, &q, gradDtype},
                 {"dk", &dk, &k, gradDtype},
                 {"dv", &dv, &v, gradDtype}};
  for (const auto &[name, tp, likep, dtype] : likes) {
    const Tensor &t = *tp, &like = *likep;
    if (!t.data) {
      error = std::string(name) + ": null data pointer";
      return false;
    }
    if (t.dtype != dtype || t.shape != like.shape) {
      error = std::string(name) + ": " + t.dtype + " " + shapeString(t.shape) +
              " must be " + dtype + " " + shapeString(like.shape) +
              (tp == &dq ? orStored : "");
      return false;
    }
    if (tp == &gradOut) {
      // The backward kernels read grad_out's rows where they read q's, so
      // it shares q's strides (GPU packages take a strided q; cpu packages
      // checked q contiguous).
      if (stridesOf(gradOut) != stridesOf(q)) {
        error = "grad_out: strides " + shapeString(stridesOf(gradOut)) +
                " differ from q's " + shapeString(stridesOf(q)) +
                " (grad_out must share q's layout)";
        return false;
      }
      continue;
    }
    if (!checkStrides(t, name, store, store, false, error))
      return false;
    if (store && !t.strides.empty() && !elementsApart(t)) {
      error = std::string(name) + ": strides " + shapeString(t.strides) +
              " make elements of shape " + shapeString(t.shape) +
              " overlap (a stored gradient must be a view without repeated "
              "elements)";
      return false;
    }
  }
  if (store && stridesOf(dk) != stridesOf(dv)) {
    error = "dv: strides " + shapeString(stridesOf(dv)) + " differ from dk's " +
            shapeString(stridesOf(dk)) + " (stored dk and dv share a layout)";
    return false;
  }
  return true;
}

/// The float32 sums of a package that finishes stored gradients: shaped
/// like q, k and v (every (batch, head) pair at once), or for the pairs of
/// one round, dq_sum [P, Lq, D] and dk_sum, dv_sum [P / G, Lk, D] with P a
/// multiple of the G = H / Hkv query heads of a kv head: runGpuBackward
/// then runs the components' kernels P pairs at a time, so that the sums
/// take P / (B * H) of the memory (docs/Backward.md, "Finished gradients").
static bool checkGradientSums(const Tensor &q, const Tensor &k,
                              const Tensor *sums, std::string &error) {
  const char *names[3] = {"dq_sum", "dk_sum", "dv_sum"};
  const int64_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3],
                Hkv = k.shape[1], Lk = k.shape[2];
  const int64_t group = H / Hkv;
  // The round's pairs, from dq_sum's leading dimension where it is 3-D.
  const int64_t pairs = sums[0].shape.size() == 3 ? sums[0].shape[0] : B * H;
  if (pairs < group || pairs % group != 0) {
    error = "dq_sum: " + shapeString(sums[0].shape) + " holds " +
            std::to_string(pairs) +
            " (batch, head) pairs: expected a "
            "multiple of the " +
            std::to_string(group) + " query heads of a kv head";
    return false;
  }
  for (int i = 0; i < 3; ++i) {
    const Tensor &t = sums[i];
    const std::vector<int64_t> &like = i == 0 ? q.shape : k.shape;
    std::vector<int64_t> round = {i == 0 ? pairs : pairs / group,
                                  i == 0 ? Lq : Lk, D};
    const bool whole = t.shape == like && sums[0].shape == q.shape;
    if (!t.data || t.dtype != "f32" || (!whole && t.shape != round) ||
        stridesOf(t) != contiguousStrides(t.shape)) {
      error = std::string(names[i]) + ": " + t.dtype + " " +
              shapeString(t.shape) + " must be a contiguous f32 " +
              shapeString(sums[0].shape.size() == 3 ? round : like) +
              (i == 0 ? " (q's shape, or [pairs, Lq, D] for pairs (batch, "
                        "head) pairs at a time)"
                      : " (matching dq_sum's)");
      return false;
    }
  }
  return true;
}

bool Package::runBackward(const Tensor &q, const Tensor &k, const Tensor &v,
                          const Tensor &out, const Tensor &lse,
                          const Tensor &gradOut, const Tensor *lengths,
                          const Tensor *keyBias, Tensor &dq, Tensor &dk,
                          Tensor &dv, std::string &error, void *stream,
                          const Tensor *sums) {
  if (!hasBackward()) {
    error = "package " + name_ + " has no backward pass (compile it with "
            "\"backward\": true)";
    return false;
  }
  // The forward's arguments as the forward checks them (out and lse are
  // inputs here), then the gradients: each shaped and typed like its input.
  if (!checkArguments(q, k, v, lengths, out, &lse, error, {keyBias, nullptr}))
    return false;
  if (ring_) {
    error = "package " + name_ + " is a ring package: its backward pass runs "
            "per rank (Package.run_ranks_backward, attn_package_run_ranks_"
            "backward; docs/Ring.md)";
    return false;
  }
  if (!checkGradients(q, k, v, out, gradOut, dq, dk, dv, error))
    return false;
  // Stored gradients of a package that finishes them take the float32 sums
  // of its components' shares; other calls take none.
  const bool store = storesGradientsInto(q, dq);
  const bool needSums = store && finishesGradients();
  if (needSums && !sums) {
    error = "package " + name_ + " stores " + q.dtype +
            " gradients after adding its earlier components' shares in "
            "float32: pass three contiguous f32 tensors shaped like q, k and v "
            "for those sums (attn_package_run_backward_with_sums_async), or "
            "float32 gradients";
    return false;
  }
  if (!needSums && sums) {
    error = "package " + name_ + " takes no float32 sums here (only " +
            "stored gradients of a package that finishes them do)";
    return false;
  }
  if (needSums && !checkGradientSums(q, k, sums, error))
    return false;
  if (isGpu()) // q, k, v, out (and grad_out) may be strided views
    return runGpuBackward(q, k, v, out, lse, gradOut, lengths, keyBias, dq,
                          dk, dv, error, stream, needSums ? sums : nullptr);
  std::vector<const Tensor *> tensors;
  for (const ArgSpec &a : backwardArgs_) {
    const std::string &n = a.name;
    tensors.push_back(n == "q"          ? &q
                      : n == "k"        ? &k
                      : n == "v"        ? &v
                      : n == "out"      ? &out
                      : n == "lse"      ? &lse
                      : n == "grad_out" ? &gradOut
                      : n == "lengths"  ? lengths
                      : n == "key_bias" ? keyBias
                      : n == "dq"       ? &dq
                      : n == "dk"       ? &dk
                      : n == "dv"       ? &dv
                                        : nullptr);
    if (!tensors.back()) {
      error = "manifest's backward names an unknown argument " + n;
      return false;
    }
  }
  return callEntry(backwardEntry_, tensors, error);
}
