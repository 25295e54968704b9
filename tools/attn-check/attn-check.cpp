//===- attn-check.cpp - check a package against the reference -------------===//
//
//   attn-check PKG [--seed N] [--q-len N] [--kv-len N] [--lengths a,b,...]
//              [--tol 1e-5] [--time]
//
// Fresh random inputs (uniform in [-1, 1), never zeros), outputs poisoned
// with NaN, one run of the package through the runtime, and a comparison with
// the double-precision reference built on the pattern library:
// ||out - ref|| / ||ref|| and the same for the finite LSE entries; rows the
// reference leaves empty must give out = 0 and lse = -inf. Prints PASS or
// FAIL with the errors; exits 1 on FAIL.
//
//===----------------------------------------------------------------------===//

#include "attn/Pattern/Reference.h"
#include "attn/Runtime/Package.h"
#include "attn/Spec/Spec.h"
#include "attn/Utils/WholeNumber.h"

#include "mlir/IR/MLIRContext.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>

using namespace mlir;
using namespace mlir::attn;
using ::attn::runtime::Package;
using ::attn::runtime::Tensor;

static int fail(const std::string &message) {
  std::fprintf(stderr, "attn-check: error: %s\n", message.c_str());
  return 2;
}

static const char *kUsage =
    "usage: attn-check PKG [--seed N] [--q-len N] [--kv-len N] "
    "[--lengths a,b,...] [--tol T] [--time]\n"
    "\n"
    "Runs a cpu package on fresh random inputs (outputs poisoned with NaN)\n"
    "and compares it with the float64 reference; prints PASS or FAIL and\n"
    "exits 0 or 1 (2 on bad arguments).\n"
    "\n"
    "  --seed N          random inputs from seed N (default 1)\n"
    "  --q-len N         query rows, for specs with dynamic lengths\n"
    "  --kv-len N        key rows (default: --q-len)\n"
    "  --lengths a,b,..  valid lengths per batch (default: random)\n"
    "  --tol T           largest relative error that passes (default 1e-5)\n"
    "  --time            also print the run's milliseconds\n";

int main(int argc, char **argv) {
  std::string pkgDir, lengthsArg;
  unsigned seed = 1;
  int64_t qLenArg = 0, kvLenArg = 0;
  double tol = 1e-5;
  bool time = false;
  std::string error;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "attn-check: error: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    int64_t n = 0;
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--seed") {
      if (!::attn::parseWholeNumber(a, value(), 0, n, error))
        return fail(error);
      seed = unsigned(n);
    } else if (a == "--q-len" || a == "--kv-len") {
      if (!::attn::parseWholeNumber(a, value(), 1, n, error))
        return fail(error);
      (a == "--q-len" ? qLenArg : kvLenArg) = n;
    } else if (a == "--lengths") {
      lengthsArg = value();
    } else if (a == "--tol") {
      std::string text = value();
      char *end = nullptr;
      tol = std::strtod(text.c_str(), &end);
      if (text.empty() || *end || !(tol > 0))
        return fail("--tol takes a positive number, got \"" + text + "\"");
    } else if (a == "--time") {
      time = true;
    } else if (a.rfind("--", 0) == 0) {
      return fail("unknown option " + a + " (attn-check --help lists them)");
    } else {
      pkgDir = a;
    }
  }
  if (pkgDir.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }

  auto pkg = Package::load(pkgDir, error);
  if (!pkg)
    return fail(error);
  MLIRContext ctx;
  std::optional<Spec> spec = parseSpec(pkg->specJson(), &ctx, error);
  if (!spec)
    return fail("the package's spec: " + error);

  ReferenceShape s{spec->batch, spec->heads, spec->kvHeads, 0, 0, spec->headDim};
  s.qLen = spec->qLen ? *spec->qLen : qLenArg;
  s.kLen = spec->kvLen ? *spec->kvLen : kvLenArg ? kvLenArg : s.qLen;
  if (s.qLen < 1 || s.kLen < 1)
    return fail("the spec has dynamic lengths: give --q-len (and --kv-len)");

  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  auto random = [&](int64_t n) {
    std::vector<float> x(n);
    for (float &e : x)
      e = uniform(rng);
    return x;
  };
  std::vector<float> q = random(s.batch * s.heads * s.qLen * s.headDim);
  std::vector<float> k = random(s.batch * s.kvHeads * s.kLen * s.headDim);
  std::vector<float> v = random(s.batch * s.kvHeads * s.kLen * s.headDim);
  std::vector<int64_t> lengths;
  std::vector<int32_t> lengths32;
  if (pkg->usesLengths()) {
    if (!lengthsArg.empty()) {
      std::stringstream ss(lengthsArg);
      std::string item;
      while (std::getline(ss, item, ',')) {
        int64_t n = 0;
        if (!::attn::parseWholeNumber("--lengths", item, 0, n, error))
          return fail(error);
        lengths.push_back(n);
      }
    } else {
      std::uniform_int_distribution<int64_t> len(0, std::min(s.qLen, s.kLen));
      for (int64_t b = 0; b < s.batch; ++b)
        lengths.push_back(len(rng));
    }
    if (int64_t(lengths.size()) != s.batch)
      return fail("--lengths needs " + std::to_string(s.batch) + " values");
    lengths32.assign(lengths.begin(), lengths.end());
  }

  std::vector<float> out(q.size(), std::nanf("")),
      lse(s.batch * s.heads * s.qLen, std::nanf(""));
  Tensor tq{q.data(), {s.batch, s.heads, s.qLen, s.headDim}, "f32"};
  Tensor tk{k.data(), {s.batch, s.kvHeads, s.kLen, s.headDim}, "f32"};
  Tensor tv{v.data(), tk.shape, "f32"};
  Tensor tl{lengths32.data(), {s.batch}, "i32"};
  Tensor tout{out.data(), tq.shape, "f32"};
  Tensor tlse{lse.data(), {s.batch, s.heads, s.qLen}, "f32"};
  auto t0 = std::chrono::steady_clock::now();
  if (!pkg->run(tq, tk, tv, pkg->usesLengths() ? &tl : nullptr, tout,
                pkg->hasLse() ? &tlse : nullptr, error))
    return fail(error);
  auto t1 = std::chrono::steady_clock::now();

  std::vector<double> refOut, refLse;
  referenceAttention(spec->pattern, spec->effectiveScale(), s, q.data(),
                     k.data(), v.data(), lengths, refOut, refLse);
  auto t2 = std::chrono::steady_clock::now();

  double num = 0, den = 0, lseNum = 0, lseDen = 0;
  int64_t badEmpty = 0, nonFinite = 0, emptyRows = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i]))
      ++nonFinite;
    num += (out[i] - refOut[i]) * (out[i] - refOut[i]);
    den += refOut[i] * refOut[i];
  }
  if (pkg->hasLse()) {
    for (size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(refLse[i])) {
        ++emptyRows;
        if (!(std::isinf(lse[i]) && lse[i] < 0))
          ++badEmpty;
        for (int64_t d = 0; d < s.headDim; ++d)
          if (out[i * s.headDim + d] != 0.0f)
            ++badEmpty;
        continue;
      }
      if (!std::isfinite(lse[i]))
        ++nonFinite;
      lseNum += (lse[i] - refLse[i]) * (lse[i] - refLse[i]);
      lseDen += refLse[i] * refLse[i];
    }
  }
  double outErr = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  double lseErr = lseDen > 0 ? std::sqrt(lseNum / lseDen) : std::sqrt(lseNum);
  bool pass = nonFinite == 0 && badEmpty == 0 && outErr <= tol && lseErr <= tol;
  std::printf("%s %s B=%lld H=%lld Hkv=%lld Lq=%lld Lk=%lld D=%lld out_err=%.3g "
              "lse_err=%.3g empty_rows=%lld bad_empty=%lld non_finite=%lld\n",
              pass ? "PASS" : "FAIL", spec->name.c_str(), (long long)s.batch,
              (long long)s.heads, (long long)s.kvHeads, (long long)s.qLen,
              (long long)s.kLen, (long long)s.headDim, outErr, lseErr,
              (long long)emptyRows, (long long)badEmpty, (long long)nonFinite);
  if (time)
    std::printf("time: package %.3f s, reference %.3f s\n",
                std::chrono::duration<double>(t1 - t0).count(),
                std::chrono::duration<double>(t2 - t1).count());
  return pass ? 0 : 1;
}
