//===- Reference.cpp - double-precision reference attention ---------------===//
//
// For every (b, h, i): scores of every key j with m(h,i,j) > 0, a max-shifted
// softmax weighted by m, in double. Knows nothing of components or tiles.
//
//===----------------------------------------------------------------------===//

#include "attn/Pattern/Reference.h"
#include "attn/Pattern/Pattern.h"

#include <cmath>
#include <limits>

using namespace mlir;
using namespace mlir::attn;

void mlir::attn::referenceAttention(Attribute pattern, double scale,
                                    const ReferenceShape &s, const float *q,
                                    const float *k, const float *v,
                                    const std::vector<int64_t> &lengths,
                                    std::vector<double> &out,
                                    std::vector<double> &lse) {
  const int64_t D = s.headDim, group = s.heads / s.kvHeads;
  out.assign(s.batch * s.heads * s.qLen * D, 0.0);
  lse.assign(s.batch * s.heads * s.qLen,
             -std::numeric_limits<double>::infinity());
  std::vector<double> scores(s.kLen), weights(s.kLen);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < s.qLen; ++i) {
        const float *qi = q + ((b * s.heads + h) * s.qLen + i) * D;
        double maxScore = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < s.kLen; ++j) {
          PairPosition pos{h, i, j, s.qLen, s.kLen,
                           lengths.empty() ? -1 : lengths[b]};
          weights[j] = double(multiplicity(pattern, pos));
          if (weights[j] == 0.0)
            continue;
          const float *kj = k + ((b * s.kvHeads + g) * s.kLen + j) * D;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d)
            dot += double(qi[d]) * double(kj[d]);
          scores[j] = scale * dot;
          maxScore = std::max(maxScore, scores[j]);
        }
        if (maxScore == -std::numeric_limits<double>::infinity())
          continue; // no attended key: O = 0, LSE = -inf
        double denom = 0.0;
        double *oi = out.data() + ((b * s.heads + h) * s.qLen + i) * D;
        for (int64_t j = 0; j < s.kLen; ++j) {
          if (weights[j] == 0.0)
            continue;
          double e = weights[j] * std::exp(scores[j] - maxScore);
          denom += e;
          const float *vj = v + ((b * s.kvHeads + g) * s.kLen + j) * D;
          for (int64_t d = 0; d < D; ++d)
            oi[d] += e * double(vj[d]);
        }
        for (int64_t d = 0; d < D; ++d)
          oi[d] /= denom;
        lse[(b * s.heads + h) * s.qLen + i] = maxScore + std::log(denom);
      }
    }
  }
}
