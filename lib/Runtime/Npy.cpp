//===- Npy.cpp - read and write NumPy .npy files --------------------------===//
//
// Parses the header dict ({'descr': '<f4', 'fortran_order': False,
// 'shape': (..)}) with plain string scanning; rejects what it cannot read
// (big-endian, Fortran order, other dtypes) with a message naming the file.
//
//===----------------------------------------------------------------------===//

#include "attn/Runtime/Npy.h"

#include <cstring>
#include <fstream>
#include <sstream>

using namespace attn::runtime;

int64_t NpyArray::numElements() const {
  int64_t n = 1;
  for (int64_t d : shape)
    n *= d;
  return n;
}

bool attn::runtime::readNpy(const std::string &path, NpyArray &array,
                            std::string &error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = path + ": cannot open file";
    return false;
  }
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    error = path + ": not a .npy file";
    return false;
  }
  uint32_t headerLen = 0;
  if (magic[6] == 1) {
    uint16_t len16;
    in.read(reinterpret_cast<char *>(&len16), 2);
    headerLen = len16;
  } else {
    in.read(reinterpret_cast<char *>(&headerLen), 4);
  }
  std::string header(headerLen, '\0');
  if (!in.read(header.data(), headerLen)) {
    error = path + ": truncated header";
    return false;
  }
  auto field = [&](const std::string &key) -> std::string {
    size_t at = header.find("'" + key + "'");
    if (at == std::string::npos)
      return "";
    at = header.find(':', at);
    return header.substr(at + 1);
  };
  std::string descr = field("descr");
  size_t q1 = descr.find('\''), q2 = descr.find('\'', q1 + 1);
  descr = descr.substr(q1 + 1, q2 - q1 - 1);
  if (descr == "<f4")
    array.dtype = "f32";
  else if (descr == "<i4")
    array.dtype = "i32";
  else if (descr == "<i8")
    array.dtype = "i64";
  else {
    error = path + ": dtype '" + descr +
            "' is not supported (use float32 for tensors, int32 or int64 for "
            "lengths)";
    return false;
  }
  if (field("fortran_order").find("True") < field("fortran_order").find(',')) {
    error = path + ": Fortran-ordered arrays are not supported (save a C-contiguous array)";
    return false;
  }
  std::string shape = field("shape");
  shape = shape.substr(shape.find('(') + 1, shape.find(')') - shape.find('(') - 1);
  array.shape.clear();
  std::stringstream ss(shape);
  std::string item;
  while (std::getline(ss, item, ','))
    if (item.find_first_not_of(" ") != std::string::npos)
      array.shape.push_back(std::stoll(item));
  size_t bytes = array.numElements() * (array.dtype == "i64" ? 8 : 4);
  array.data.resize(bytes);
  if (!in.read(array.data.data(), bytes)) {
    error = path + ": file holds fewer elements than its shape says";
    return false;
  }
  return true;
}

bool attn::runtime::writeNpy(const std::string &path,
                             const std::vector<int64_t> &shape,
                             const float *data, std::string &error) {
  // Python's tuple syntax: "(5,)" for one dimension, "(2, 3)" otherwise.
  std::string dims;
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += (i ? ", " : "") + std::to_string(shape[i]);
    n *= shape[i];
  }
  if (shape.size() == 1)
    dims += ",";
  std::string header =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) {
    error = path + ": cannot write file";
    return false;
  }
  uint16_t len = header.size();
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char *>(&len), 2);
  out << header;
  out.write(reinterpret_cast<const char *>(data), n * sizeof(float));
  if (!out) {
    error = path + ": write failed";
    return false;
  }
  return true;
}
