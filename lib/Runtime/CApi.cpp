//===- CApi.cpp - the runtime's C API -------------------------------------===//
//
// Thin C wrappers over attn::runtime::Package with a thread-local last error.
//
//===----------------------------------------------------------------------===//

#include "attn-c/attn.h"
#include "attn/Runtime/Package.h"

#include <string>

using attn::runtime::Package;
using attn::runtime::Tensor;

struct attn_package {
  std::unique_ptr<Package> impl;
};

static thread_local std::string lastError;

static attn_status failWith(attn_status status, const std::string &message) {
  lastError = message;
  return status;
}

static bool toTensor(const attn_tensor *t, const char *name, Tensor &out) {
  if (!t || !t->shape || t->rank < 0 || t->rank > 8) {
    lastError = std::string(name) + ": missing tensor or bad rank";
    return false;
  }
  out.data = t->data;
  out.shape.assign(t->shape, t->shape + t->rank);
  out.dtype = t->dtype == ATTN_F32 ? "f32" : t->dtype == ATTN_I32 ? "i32" : "?";
  return true;
}

extern "C" {

attn_status attn_package_load(const char *path, attn_package **out) {
  if (!path || !out)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_load: null argument");
  std::string error;
  auto pkg = Package::load(path, error);
  if (!pkg)
    return failWith(error.find("cannot open") != std::string::npos
                        ? ATTN_ERROR_IO
                        : ATTN_ERROR_PACKAGE,
                    error);
  *out = new attn_package{std::move(pkg)};
  return ATTN_OK;
}

void attn_package_free(attn_package *package) { delete package; }

const char *attn_package_target(const attn_package *package) {
  return package ? package->impl->target().c_str() : "";
}
int attn_package_uses_lengths(const attn_package *package) {
  return package && package->impl->usesLengths();
}
int attn_package_has_lse(const attn_package *package) {
  return package && package->impl->hasLse();
}

attn_status attn_package_run(attn_package *package, const attn_tensor *q,
                             const attn_tensor *k, const attn_tensor *v,
                             const attn_tensor *lengths, attn_tensor *out,
                             attn_tensor *lse) {
  if (!package)
    return failWith(ATTN_ERROR_ARGUMENT, "attn_package_run: null package");
  Tensor tq, tk, tv, tl, to, tlse;
  if (!toTensor(q, "q", tq) || !toTensor(k, "k", tk) || !toTensor(v, "v", tv) ||
      !toTensor(out, "out", to) || (lengths && !toTensor(lengths, "lengths", tl)) ||
      (lse && !toTensor(lse, "lse", tlse)))
    return ATTN_ERROR_ARGUMENT;
  std::string error;
  if (!package->impl->run(tq, tk, tv, lengths ? &tl : nullptr, to,
                          lse ? &tlse : nullptr, error))
    return failWith(ATTN_ERROR_ARGUMENT, error);
  return ATTN_OK;
}

const char *attn_last_error(void) { return lastError.c_str(); }

} // extern "C"
