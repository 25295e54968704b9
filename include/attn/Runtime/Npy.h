//===- Npy.h - read and write NumPy .npy files ------------------*- C++ -*-===//
//
// Just enough of the .npy format (version 1.0/2.0, little-endian, C order)
// for attn-run: float32 tensors and int32/int64 lengths.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_RUNTIME_NPY_H
#define ATTN_RUNTIME_NPY_H

#include <cstdint>
#include <string>
#include <vector>

namespace attn::runtime {

struct NpyArray {
  std::string dtype; ///< "f32", "i32" or "i64"
  std::vector<int64_t> shape;
  std::vector<char> data;
  int64_t numElements() const;
};

/// Reads `path`; on failure returns false and sets `error`.
bool readNpy(const std::string &path, NpyArray &array, std::string &error);
/// Writes a float32 array.
bool writeNpy(const std::string &path, const std::vector<int64_t> &shape,
              const float *data, std::string &error);

} // namespace attn::runtime

#endif // ATTN_RUNTIME_NPY_H
