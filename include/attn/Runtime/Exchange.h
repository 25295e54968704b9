//===- Exchange.h - all-to-all of variable-sized blocks over a Transport -===//
//
// Distributed tokenized attention (docs/Tokenized.md) shards the embedding
// tables by id: every rank asks the owners of its unique ids for their
// embeddings. That is two all-to-alls of variable-sized blocks (ids out,
// embeddings back), built here from the ring's pairwise Transport::exchange:
// in step s = 1 .. N-1 rank r sends its block for rank r+s and receives the
// block of rank r-s (mod N), so every step pairs each sender with exactly one
// receiver and no rank waits on another that is not yet sending.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_RUNTIME_EXCHANGE_H
#define ATTN_RUNTIME_EXCHANGE_H

#include <cstdint>
#include <string>
#include <vector>

namespace attn::runtime {

class Transport;

/// One rank's side of an all-to-all. `send` holds the blocks for ranks
/// 0 .. N-1 back to back (`sendBytes[p]` for rank p), `recv` receives the
/// blocks from ranks 0 .. N-1 back to back (`recvBytes[p]` from rank p; the
/// sizes must be known, e.g. from a first all-to-all of sizes). `device`:
/// the buffers are device memory and the copies are queued on `stream`
/// (NCCL); otherwise host memory (any transport). `tag` numbers this
/// all-to-all among the ones the ranks run in the same order (the in-process
/// transport matches messages by it). Returns false and sets `error`.
bool allToAll(Transport &transport, int64_t tag, const void *send,
              const std::vector<int64_t> &sendBytes, void *recv,
              const std::vector<int64_t> &recvBytes, bool device, void *stream,
              std::string &error);

} // namespace attn::runtime

#endif // ATTN_RUNTIME_EXCHANGE_H
