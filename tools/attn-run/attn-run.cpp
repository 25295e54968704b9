//===- attn-run.cpp - run a compiled attention package --------------------===//
//
//   attn-run PKG --q q.npy --k k.npy --v v.npy [--lengths len.npy]
//            -o out.npy [--lse lse.npy] [--device cpu] [--repeat N]
//
// Reads float32 .npy inputs (lengths int32 or int64), runs the package and
// writes float32 outputs. Links only the runtime: no MLIR, no LLVM.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/Npy.h"
#include "attn/Runtime/Package.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <map>
#include <string>

using namespace attn::runtime;

static int usage() {
  std::fprintf(stderr,
               "usage: attn-run PKG --q q.npy --k k.npy --v v.npy "
               "[--lengths len.npy] -o out.npy [--lse lse.npy] "
               "[--device cpu] [--repeat N]\n");
  return 2;
}

static int fail(const std::string &message) {
  std::fprintf(stderr, "attn-run: error: %s\n", message.c_str());
  return 1;
}

int main(int argc, char **argv) {
  std::string pkgDir;
  std::map<std::string, std::string> opts{{"--device", "cpu"}, {"--repeat", "1"}};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help")
      return usage(), 0;
    if (a == "-o")
      a = "--out";
    if (a.rfind("--", 0) == 0) {
      static const char *known[] = {"--q", "--k", "--v", "--lengths", "--out",
                                    "--lse", "--device", "--repeat"};
      if (std::find(std::begin(known), std::end(known), a) == std::end(known))
        return fail("unknown option " + a), usage();
      if (i + 1 >= argc)
        return fail(a + " needs a value");
      opts[a] = argv[++i];
    } else if (pkgDir.empty()) {
      pkgDir = a;
    } else {
      return fail("unexpected argument " + a);
    }
  }
  if (pkgDir.empty())
    return usage();
  for (const char *required : {"--q", "--k", "--v", "--out"})
    if (!opts.count(required))
      return fail(std::string("missing ") + required);
  const std::string device = opts["--device"];
  if (device != "cpu" && device != "cuda")
    return fail("--device must be cpu or cuda, got " + device);
  int repeat = std::atoi(opts["--repeat"].c_str());
  if (repeat < 1)
    return fail("--repeat must be >= 1");

  std::string error;
  auto pkg = Package::load(pkgDir, error);
  if (!pkg)
    return fail(error);
  if (device == "cuda")
    return fail("package " + pkgDir + " targets " + pkg->target() +
                "; --device cuda runs GPU packages, which this runtime build "
                "does not include yet");

  NpyArray q, k, v, len;
  for (auto [name, array] : {std::pair<const char *, NpyArray *>{"--q", &q},
                             {"--k", &k}, {"--v", &v}}) {
    if (!readNpy(opts[name], *array, error))
      return fail(error);
    if (array->dtype != "f32")
      return fail(opts[name] + ": " + (name + 2) + " must be float32, got " +
                  array->dtype);
  }
  std::vector<int32_t> lengths32;
  Tensor lengthsTensor;
  if (opts.count("--lengths")) {
    if (!readNpy(opts["--lengths"], len, error))
      return fail(error);
    if (len.dtype == "f32")
      return fail(opts["--lengths"] + ": lengths must be int32 or int64");
    for (int64_t i = 0; i < len.numElements(); ++i)
      lengths32.push_back(len.dtype == "i32"
                              ? reinterpret_cast<int32_t *>(len.data.data())[i]
                              : int32_t(reinterpret_cast<int64_t *>(len.data.data())[i]));
    lengthsTensor = {lengths32.data(), len.shape, "i32"};
  }

  auto tensor = [](NpyArray &a) { return Tensor{a.data.data(), a.shape, "f32"}; };
  Tensor tq = tensor(q), tk = tensor(k), tv = tensor(v);
  // Outputs start poisoned with NaN so that an element the kernel skips shows.
  std::vector<float> out(q.numElements(), std::nanf(""));
  std::vector<int64_t> lseShape(q.shape.begin(), q.shape.end() - (q.shape.empty() ? 0 : 1));
  std::vector<float> lse(q.shape.size() == 4 ? q.shape[0] * q.shape[1] * q.shape[2] : 0,
                         std::nanf(""));
  Tensor tout{out.data(), q.shape, "f32"}, tlse{lse.data(), lseShape, "f32"};
  bool wantLse = opts.count("--lse");
  if (wantLse && !pkg->hasLse())
    return fail("--lse given but package " + pkgDir + " was compiled with \"lse\": false");

  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    if (!pkg->run(tq, tk, tv, opts.count("--lengths") ? &lengthsTensor : nullptr,
                  tout, wantLse ? &tlse : nullptr, error))
      return fail(error);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  if (repeat > 1)
    std::printf("attn-run: best of %d runs: %.3f ms\n", repeat, best * 1e3);
  if (!writeNpy(opts["--out"], q.shape, out.data(), error))
    return fail(error);
  if (wantLse && !writeNpy(opts["--lse"], lseShape, lse.data(), error))
    return fail(error);
  return 0;
}
