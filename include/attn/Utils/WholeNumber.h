//===- WholeNumber.h - whole-number command-line values ---------*- C++ -*-===//
//
// The tools' numeric options (attn-check, attn-run): a value is a whole
// number at least some minimum, or an error that names the option and what
// it got, rather than atoi's silent 0 or std::stoll's exception.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_UTILS_WHOLENUMBER_H
#define ATTN_UTILS_WHOLENUMBER_H

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace attn {

/// `text` as a whole number >= `min` in `value`; false, with `error` naming
/// `option`, otherwise.
inline bool parseWholeNumber(const std::string &option, const std::string &text,
                             int64_t min, int64_t &value, std::string &error) {
  char *end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end || errno || v < min) {
    error = option + " takes a whole number >= " + std::to_string(min) +
            ", got \"" + text + "\"";
    return false;
  }
  value = v;
  return true;
}

} // namespace attn

#endif // ATTN_UTILS_WHOLENUMBER_H
