/*===- attn.h - C API of the attn runtime ---------------------------------===*
 *
 * Load a compiled attention package and run it on caller-owned buffers. No
 * MLIR or LLVM dependency; usable from C, Python (ctypes) and other hosts.
 * Every call returns ATTN_OK or an error code; attn_last_error() then says
 * what was wrong (thread-local). A loaded package may be run from several
 * threads and on several streams at once (docs/Package.md: calls take
 * turns queueing, and packages that keep a state between their kernels
 * order their calls across streams).
 *
 *===----------------------------------------------------------------------===*/

#ifndef ATTN_C_ATTN_H
#define ATTN_C_ATTN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum attn_status {
  ATTN_OK = 0,
  ATTN_ERROR_IO = 1,        /* a file is missing or unreadable */
  ATTN_ERROR_PACKAGE = 2,   /* the package is malformed or for another target */
  ATTN_ERROR_ARGUMENT = 3,  /* a tensor has the wrong shape, dtype or value */
  ATTN_ERROR_RUNTIME = 4    /* the kernel could not run */
} attn_status;

typedef enum attn_dtype {
  ATTN_F32 = 0,
  ATTN_I32 = 1,
  ATTN_BF16 = 2,
  ATTN_F16 = 3
} attn_dtype;

/* A tensor owned by the caller: C-contiguous, or with `strides` (one per
   dimension, in elements; NULL means C-contiguous). GPU packages take
   strided q, k, v and out whose rows (the last dimension) are contiguous
   and whose other strides are multiples of 8 elements, e.g. the
   [B, H, L, D] view of a [B, L, H, D] tensor; k and v share their strides,
   and out's elements must not overlap. Every other tensor, and every
   tensor of a cpu package, is C-contiguous. */
typedef struct attn_tensor {
  void *data;
  const int64_t *shape;
  int32_t rank;
  attn_dtype dtype;
  const int64_t *strides;
} attn_tensor;

typedef struct attn_package attn_package;

/* Loads the package in directory `path` (manifest.json + kernels). */
attn_status attn_package_load(const char *path, attn_package **out);
void attn_package_free(attn_package *package);

/* The package's target ("cpu", "sm_90a", ...) and whether it reads lengths
 * and writes the log-sum-exp. */
const char *attn_package_target(const attn_package *package);
/* GPU packages: the device they were loaded on (the CUDA context current at
 * load, or else device 0's primary context); their kernels run only in that
 * context, so load a package once per GPU. -1 for cpu packages. */
int attn_package_device(const attn_package *package);
int attn_package_uses_lengths(const attn_package *package);
int attn_package_has_lse(const attn_package *package);

/* Runs attention: q [B,H,Lq,D], k and v [B,Hkv,Lk,D] in the package's dtype
 * (f32 for cpu, bf16/f16 for GPU targets); lengths [B] i32 (NULL unless the
 * pattern is tokenized); out [B,H,Lq,D] like q; lse [B,H,Lq] f32 or NULL.
 * For a GPU package every pointer is a device pointer; this call runs on
 * the default stream and waits for the result. */
attn_status attn_package_run(attn_package *package, const attn_tensor *q,
                             const attn_tensor *k, const attn_tensor *v,
                             const attn_tensor *lengths, attn_tensor *out,
                             attn_tensor *lse);

/* Whether the package was compiled with "key_bias": true, and attn_package_run
 * with key_bias [B, Lk] f32 added to every score of key j of batch b (all
 * heads): log(count) for deduplicated tokens, -inf for keys to ignore
 * (docs/Tokenized.md). */
int attn_package_uses_key_bias(const attn_package *package);
attn_status attn_package_run_biased(attn_package *package, const attn_tensor *q,
                                    const attn_tensor *k, const attn_tensor *v,
                                    const attn_tensor *lengths,
                                    const attn_tensor *key_bias,
                                    attn_tensor *out, attn_tensor *lse);

/* Whether the package was compiled with "key_ids": true: k and v are then
 * embedding tables [1, Hkv, V, D] and key j of batch b is row
 * key_ids[b, j] (i32 [B, Lk]) of them, read in place by the kernels.
 * attn_package_run_keys takes key_bias and key_ids (either may be NULL, as
 * the package requires); GPU packages are queued on `stream` without
 * waiting, cpu packages run before it returns (and check the ids lie in
 * [0, V); GPU kernels read rows outside as zeros). */
int attn_package_uses_key_ids(const attn_package *package);
attn_status attn_package_run_keys(attn_package *package, const attn_tensor *q,
                                  const attn_tensor *k, const attn_tensor *v,
                                  const attn_tensor *lengths,
                                  const attn_tensor *key_bias,
                                  const attn_tensor *key_ids, attn_tensor *out,
                                  attn_tensor *lse, void *stream);

/* GPU packages compiled with "key_ids": true also turn B token sequences
 * into the key_ids and key_bias of their unique ids (docs/Tokenized.md,
 * "The dedup_keys kernel"), queued on `stream` without waiting. All
 * pointers are device memory on the package's device: tokens i64 [B, L],
 * lengths i64 [B] (clamped to [0, L]) in; key_ids i32 [B, L] (each
 * sequence's unique ids ascending, 0 past them), key_bias f32 [B, L]
 * (log(count), -inf past them), slot_at i64 [B, L] (each position's index
 * into its row of key_ids, -1 past the length) and info i64 [B, 4] (unique
 * ids, the length as given, the smallest and the largest id) out. L may be
 * at most attn_package_dedup_max_len (0 for packages without the kernel). */
int64_t attn_package_dedup_max_len(const attn_package *package);
attn_status attn_package_dedup_keys(attn_package *package, const int64_t *tokens,
                                    const int64_t *lengths, int64_t batch,
                                    int64_t seq_len, int32_t *key_ids,
                                    float *key_bias, int64_t *slot_at,
                                    int64_t *info, void *stream);

/* The backward pass (docs/Backward.md), for packages compiled with
 * "backward": true: from the forward's inputs, its out and lse, and grad_out
 * (the gradient of out, like out), writes dq, dk and dv (f32, contiguous,
 * shaped like q, k and v). Packages for which
 * attn_package_stores_gradients is 1 (GPU packages of one component, or
 * of several that finish the gradients, docs/Backward.md) also take
 * dq, dk and dv of the input type, in any layout whose rows are contiguous
 * (dk and dv sharing one), and store into them (the latter through
 * attn_package_run_backward_with_sums_async).
 * lengths and key_bias as the package requires, else NULL. For GPU packages
 * the pointers are device memory; attn_package_run_backward runs on the
 * default stream and waits for it. */
int attn_package_has_backward(const attn_package *package);
int attn_package_stores_gradients(const attn_package *package);
attn_status attn_package_run_backward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv);
/* GPU packages only: the backward pass queued on `stream` (a CUstream, NULL
 * for the default stream), returning without waiting. */
attn_status attn_package_run_backward_async(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv, void *stream);
/* GPU packages of several components one of which writes every element
 * once (attn_package_finishes_gradients is 1; strided with its band, or
 * LongNet, for two) store gradients of the input type, each element by the
 * last component that writes it, the earlier ones adding their shares into
 * float32 sums: dq_sum, dk_sum and dv_sum, contiguous f32 tensors shaped
 * like q, k and v (scratch: their contents afterwards are unspecified),
 * which attn_package_run_backward_async cannot take. Sums for a round of
 * P (batch, head) pairs, dq_sum [P, Lq, D] and dk_sum, dv_sum
 * [P / G, Lk, D] (P a multiple of the G = H / Hkv query heads of a kv
 * head), take less memory: the kernels then run P pairs at a time. */
int attn_package_finishes_gradients(const attn_package *package);
attn_status attn_package_run_backward_with_sums_async(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths,
    const attn_tensor *key_bias, attn_tensor *dq, attn_tensor *dk,
    attn_tensor *dv, attn_tensor *dq_sum, attn_tensor *dk_sum,
    attn_tensor *dv_sum, void *stream);

/* GPU packages only: queues the kernels on `stream` (a CUstream, NULL for
 * the default stream) and returns without waiting. Lengths outside [0, Lk]
 * are clamped on the device. */
attn_status attn_package_run_async(attn_package *package, const attn_tensor *q,
                                   const attn_tensor *k, const attn_tensor *v,
                                   const attn_tensor *lengths, attn_tensor *out,
                                   attn_tensor *lse, void *stream);

/* The message of the last failed call on this thread. */
/* Ring packages (specs with a "distribution" section). attn_package_ranks
 * returns the number of ranks (0 for other packages).
 * attn_package_run_ranks runs every rank of a ring package in this
 * process, one thread per rank (GPU packages: all on the package's GPU,
 * device-to-device copies between ranks), on the whole float32 host
 * sequence: q [B,H,Lq,D],
 * k/v [B,Hkv,Lk,D] -> out [B,H,Lq,D][, lse [B,H,Lq]]. If bytes_sent is not
 * NULL it receives, per rank, the bytes that rank sent (K and V). */
int64_t attn_package_ranks(const attn_package *package);
/* The global query rows of `rank`'s local rows (q, out, lse), in order (the
 * package's layout, docs/Ring.md): returns the rows per rank (q_len /
 * ranks) and, if `positions` is not NULL, writes that many row indices to
 * it; -1 (attn_last_error says why) for a package that is not distributed
 * or a rank outside [0, ranks). attn_package_rank_key_positions: the same
 * for its key rows (k, v; kv_len / ranks), which differ from the query rows
 * only for cross attention (q_len != kv_len). */
int64_t attn_package_rank_positions(const attn_package *package, int64_t rank,
                                    int64_t *positions);
int64_t attn_package_rank_key_positions(const attn_package *package,
                                        int64_t rank, int64_t *positions);
attn_status attn_package_run_ranks(attn_package *package, const attn_tensor *q,
                                   const attn_tensor *k, const attn_tensor *v,
                                   const attn_tensor *lengths, attn_tensor *out,
                                   attn_tensor *lse, int64_t *bytes_sent);

/* The backward pass of a ring package compiled with "backward": true,
 * every rank a thread as in attn_package_run_ranks: from the whole
 * float32 sequence's q, k, v, the forward's out and lse, and grad_out,
 * writes dq, dk and dv of the whole sequence (shaped like q, k and v). Each
 * rank receives the forward's key/value rows again and sends the gradients
 * of those rows back to their owner (docs/Ring.md). If bytes_sent is not
 * NULL it receives, per rank, the bytes that rank sent (both ways). */
attn_status attn_package_run_ranks_backward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths, attn_tensor *dq,
    attn_tensor *dk, attn_tensor *dv, int64_t *bytes_sent);

/* GPU ring packages, one process per GPU (torchrun or any launcher):
 * rank 0 makes an NCCL id (attn_nccl_unique_id) and every rank gets it
 * (torch.distributed broadcast, a file, ...); each rank then joins with its
 * rank and calls attn_package_run_rank on its chunk (device pointers,
 * queued on `stream`) and attn_package_wait_rank, which waits without
 * hanging on a dead peer (error after timeout_seconds). */
attn_status attn_nccl_unique_id(char id[128]);
attn_status attn_package_join(attn_package *package, int rank, int nranks,
                              const char id[128]);
attn_status attn_package_run_rank(attn_package *package, const attn_tensor *q,
                                  const attn_tensor *k, const attn_tensor *v,
                                  const attn_tensor *lengths, attn_tensor *out,
                                  attn_tensor *lse, void *stream,
                                  int64_t *bytes_sent);
attn_status attn_package_wait_rank(attn_package *package, void *stream,
                                   double timeout_seconds);
/* The backward pass of this rank (a ring package compiled with "backward":
 * true), after attn_package_join: from the rank's chunks of q, k, v, the
 * forward's out and lse, and grad_out, writes the rank's dq, dk and dv (f32,
 * contiguous, shaped like q, k and v). Every rank calls it, in the same
 * order as its other ring calls. Queued on `stream`; wait with
 * attn_package_wait_rank. bytes_sent: key/value rows out and the gradients
 * of the rows it received back (docs/Ring.md). */
attn_status attn_package_run_rank_backward(
    attn_package *package, const attn_tensor *q, const attn_tensor *k,
    const attn_tensor *v, const attn_tensor *out, const attn_tensor *lse,
    const attn_tensor *grad_out, const attn_tensor *lengths, attn_tensor *dq,
    attn_tensor *dk, attn_tensor *dv, void *stream, int64_t *bytes_sent);
/* After attn_package_wait_rank: the milliseconds of each step of the last
 * run (up to `capacity`); returns the number of steps, or -1 on error. */
int attn_package_step_ms(attn_package *package, float *ms, int capacity);

/* Exchange groups for distributed tokenized attention (docs/Tokenized.md):
 * an in-process hub whose members are threads standing for ranks (host
 * memory; what CI runs), or an NCCL member per process (device memory;
 * every rank passes rank 0's attn_nccl_unique_id and the same group_name).
 * attn_all_to_all sends send_bytes[p] bytes to rank p from `send` (blocks
 * back to back in rank order) and receives recv_bytes[p] from rank p into
 * `recv`; every rank calls it in the same order. NCCL members queue the
 * copies on `stream`. A failed or silent peer gives an error after the
 * hub's timeout, never a hang. */
typedef struct attn_hub attn_hub;
typedef struct attn_member attn_member;
attn_status attn_hub_create(int ranks, double timeout_seconds, attn_hub **out);
void attn_hub_free(attn_hub *hub);
attn_status attn_hub_member(attn_hub *hub, int rank, attn_member **out);
attn_status attn_nccl_member(int rank, int nranks, const char id[128],
                             const char *group_name, attn_member **out);
void attn_member_free(attn_member *member);
attn_status attn_all_to_all(attn_member *member, const void *send,
                            const int64_t *send_bytes, void *recv,
                            const int64_t *recv_bytes, void *stream);

const char *attn_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* ATTN_C_ATTN_H */
