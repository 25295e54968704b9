//===- AttnOps.td - attn dialect operations ----------------*- tablegen -*-===//
//
// `attn.attention` is what users write (tensors, a pattern). attn-decompose
// rewrites it into `attn.init_state`, one `attn.component` per dense component
// and `attn.finalize`; these three are destination-style and exist on tensors
// (with results) and on memrefs (in place, no results). attn-tile turns each
// memref `attn.component` into closed-form loops of `attn.tile_update`.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_OPS
#define ATTN_OPS

include "attn/Dialect/Attn/IR/AttnDialect.td"
include "attn/Dialect/Attn/IR/AttnAttrs.td"
include "mlir/IR/OpBase.td"
include "mlir/Interfaces/SideEffectInterfaces.td"

class Attn_Op<string mnemonic, list<Trait> traits = []>
    : Op<Attn_Dialect, mnemonic, traits>;

def Attn_AnyPattern : Attr<
    CPred<"::llvm::isa<::mlir::attn::PatternAttrInterface>($_self)">,
    "attention pattern attribute"> {
  let storageType = "::mlir::Attribute";
  let returnType = "::mlir::Attribute";
  let convertFromStorage = "$_self";
}

def Attn_FloatTensor : RankedTensorOf<[F32, F16, BF16]>;
def Attn_LengthsTensor : RankedTensorOf<[I32, I64]>;

def Attn_AttentionOp : Attn_Op<"attention", [Pure, AttrSizedOperandSegments]> {
  let summary = "attention with a sparsity pattern";
  let description = [{
    Computes, for every batch `b`, head `h` and query row `i`:

        s_ij  = scale * q[b,h,i,:] . k[b,g,j,:] (+ key_bias[b,j])
                                                     g = h / (H / Hkv)
        O_i   = sum_j m(h,i,j) exp(s_ij) v[b,g,j,:] / sum_j m(h,i,j) exp(s_ij)
        LSE_i = log sum_j m(h,i,j) exp(s_ij)

    `query` is `[B, H, Lq, D]`, `key` and `value` are `[B, Hkv, Lk, D]` with
    `Hkv` dividing `H` (grouped-query attention). `lengths` (`[B]`) is required
    by tokenized patterns. The optional `key_bias` (`[B, Lk]`, f32) is added
    to every score of key `j` (all heads): `log(count)` for deduplicated
    tokens, `-inf` for keys to ignore (docs/Tokenized.md). With the optional
    `key_ids` (`[B, Lk]`, i32), `key` and `value` are embedding tables
    `[1, Hkv, V, D]` and key `j` of batch `b` is row `key_ids[b, j]` of them
    (read in place: no per-position K/V). `scale` defaults to
    `1/sqrt(D)`. The results are the
    output `[B, H, Lq, D]` and, optionally, the log-sum-exp `[B, H, Lq]` in
    f32. Rows with no attended key give 0 and `-inf`.

    Example:
    ```mlir
    %o, %lse = attn.attention %q, %k, %v pattern(#attn.local<window = 256>)
        : tensor<1x8x?x64xf32>, tensor<1x8x?x64xf32>, tensor<1x8x?x64xf32>
        -> tensor<1x8x?x64xf32>, tensor<1x8x?xf32>
    ```
  }];
  let arguments = (ins Attn_FloatTensor:$query, Attn_FloatTensor:$key,
                       Attn_FloatTensor:$value,
                       Optional<Attn_LengthsTensor>:$lengths,
                       Optional<RankedTensorOf<[F32]>>:$key_bias,
                       Optional<RankedTensorOf<[I32]>>:$key_ids,
                       Attn_AnyPattern:$pattern,
                       OptionalAttr<F64Attr>:$scale);
  let results = (outs Attn_FloatTensor:$output,
                      Optional<RankedTensorOf<[F32]>>:$lse);
  let assemblyFormat = [{
    $query `,` $key `,` $value (`lengths` `(` $lengths^ `)`)?
    (`key_bias` `(` $key_bias^ `:` type($key_bias) `)`)?
    (`key_ids` `(` $key_ids^ `:` type($key_ids) `)`)?
    `pattern` `(` $pattern `)` attr-dict `:` type($query) `,` type($key) `,`
    type($value) (`,` type($lengths)^)? `->` type(results)
  }];
  let hasVerifier = 1;
  let extraClassDeclaration = [{
    /// The softmax scale: the attribute, or 1/sqrt(head_dim).
    double getEffectiveScale();
  }];
}

def Attn_InitStateOp : Attn_Op<"init_state"> {
  let summary = "reset an online-softmax state";
  let description = [{
    Sets the accumulator `acc [B,H,Lq,D]` to 0, the running maximum
    `max [B,H,Lq]` to -inf and the running denominator `sum [B,H,Lq]` to 0.
    On tensors it returns the initialised state; on memrefs it writes in place.
  }];
  let arguments = (ins AnyShaped:$acc, AnyShaped:$max, AnyShaped:$sum);
  let results = (outs Variadic<AnyRankedTensor>:$results);
  let assemblyFormat = [{
    `outs` `(` $acc `,` $max `,` $sum `)` attr-dict `:` type($acc) `,`
    type($max) `,` type($sum) (`->` type($results)^)?
  }];
  let hasVerifier = 1;
}

def Attn_ComponentOp : Attn_Op<"component", [AttrSizedOperandSegments]> {
  let summary = "add one dense component's pairs to an online-softmax state";
  let description = [{
    For every pair (i, j) of the component (see `#attn.component`) updates the
    state of row i with score `scale * q_i . k_j (+ key_bias[b, j])` and value `v_j`:

        newMax = max(max, s)
        sum    = sum * exp(max - newMax) + exp(s - newMax)
        acc    = acc * exp(max - newMax) + exp(s - newMax) * v_j

    Several components continue one state, which sums their multiplicities.
    With `key_ids`, key `j` is row `key_ids[b, j]` of the tables `key` and
    `value` (`[1, Hkv, V, D]`).

    Optional `origins(%q_origin, %k_origin)` place query row 0 and key row 0 at
    those global positions (a rank's slice of a longer sequence in ring
    attention); rows and keys then sit at `origin + index` and `lengths`
    bound positions. Five values `origins(%q_origin, %k_origin, %q_pos,
    %k_pos, %stride)` keep the origins for the groups and bands but let
    `lengths` and filters see row `i` at `q_pos + stride * i` and key `j` at
    `k_pos + stride * j` (the striped ring layout, docs/Ring.md). Without
    origins, row `i` sits at `i + Lk - Lq` and key `j` at `j` (bottom-right
    alignment).
  }];
  let arguments = (ins AnyShaped:$query, AnyShaped:$key, AnyShaped:$value,
                       Optional<AnyShaped>:$lengths,
                       Optional<AnyShaped>:$key_bias,
                       Optional<AnyShaped>:$key_ids,
                       AnyShaped:$acc, AnyShaped:$max, AnyShaped:$sum,
                       Variadic<Index>:$origins,
                       Attn_ComponentAttr:$component, F64Attr:$scale);
  let results = (outs Variadic<AnyRankedTensor>:$results);
  let assemblyFormat = [{
    $query `,` $key `,` $value (`lengths` `(` $lengths^ `:` type($lengths) `)`)?
    (`key_bias` `(` $key_bias^ `:` type($key_bias) `)`)?
    (`key_ids` `(` $key_ids^ `:` type($key_ids) `)`)?
    `state` `(` $acc `,` $max `,` $sum `)`
    (`origins` `(` $origins^ `)`)? $component attr-dict `:`
    type($query) `,` type($key) `,` type($value) `,` type($acc) `,`
    type($max) `,` type($sum) (`->` type($results)^)?
  }];
  let hasVerifier = 1;
}

def Attn_FinalizeOp : Attn_Op<"finalize"> {
  let summary = "normalise an online-softmax state into output and LSE";
  let description = [{
    `out = acc / sum` and `lse = max + log(sum)`; rows with `sum == 0` give
    `out = 0` and `lse = -inf`. The output is converted to its element type.
  }];
  let arguments = (ins AnyShaped:$acc, AnyShaped:$max, AnyShaped:$sum,
                       AnyShaped:$output, Optional<AnyShaped>:$lse);
  let results = (outs Variadic<AnyRankedTensor>:$results);
  let assemblyFormat = [{
    `state` `(` $acc `,` $max `,` $sum `)` `outs` `(` $output (`,` $lse^)? `)`
    attr-dict `:` type($acc) `,` type($max) `,` type($sum) `,` type($output)
    (`,` type($lse)^)? (`->` type($results)^)?
  }];
  let hasVerifier = 1;
}

def Attn_TileUpdateOp : Attn_Op<"tile_update", [AttrSizedOperandSegments]> {
  let summary = "online-softmax update of one (row tile, key tile) block";
  let description = [{
    Inside the group of `component` whose position `t = 0` is `group_base`,
    updates rows `t_q in [row_begin, row_end)` with keys
    `t_k in [key_begin, key_end)` of batch `batch` and head `head`. The tile
    schedule (attn-tile) proves which blocks are entirely inside the component;
    only blocks marked `masked` evaluate the band and filters per element.
    `max_keys` bounds `key_end - key_begin` (the key tile size), so that the
    lowering can keep one row of scores in a fixed-size buffer. `origins`
    are the component's (global positions of query row 0 and key row 0).
  }];
  let arguments = (ins AnyMemRef:$query, AnyMemRef:$key, AnyMemRef:$value,
                       Optional<AnyMemRef>:$lengths,
                       Optional<AnyMemRef>:$key_bias,
                       Optional<AnyMemRef>:$key_ids,
                       AnyMemRef:$acc, AnyMemRef:$max, AnyMemRef:$sum,
                       Index:$batch, Index:$head, Index:$group_base,
                       Index:$row_begin, Index:$row_end,
                       Index:$key_begin, Index:$key_end,
                       Variadic<Index>:$origins,
                       Attn_ComponentAttr:$component, F64Attr:$scale,
                       I64Attr:$max_keys, UnitAttr:$masked);
  let assemblyFormat = [{
    $query `,` $key `,` $value (`lengths` `(` $lengths^ `:` type($lengths) `)`)?
    (`key_bias` `(` $key_bias^ `:` type($key_bias) `)`)?
    (`key_ids` `(` $key_ids^ `:` type($key_ids) `)`)?
    `state` `(` $acc `,` $max `,` $sum `)`
    `at` `[` $batch `,` $head `,` $group_base `]`
    `rows` `[` $row_begin `,` $row_end `)` `keys` `[` $key_begin `,` $key_end `)`
    (`origins` `(` $origins^ `)`)? $component attr-dict `:` type($query) `,` type($key) `,` type($value) `,`
    type($acc) `,` type($max) `,` type($sum)
  }];
}

//===----------------------------------------------------------------------===//
// The backward pass (CPU target): gradients of attn.attention
//===----------------------------------------------------------------------===//

def Attn_AttentionGradOp : Attn_Op<"attention_grad",
                                   [Pure, AttrSizedOperandSegments]> {
  let summary = "gradients of attention with a sparsity pattern";
  let description = [{
    The backward pass of `attn.attention` with the same pattern and scale:
    given the forward's `output` and `lse` and the gradient `grad_output` of
    the output, returns `dq`, `dk` and `dv` (types of q, k and v). With the
    forward's probabilities recomputed from the lse,

        P_ij  = m(h,i,j) exp(s_ij - lse_i)
        dV_j  = sum_i P_ij dO_i
        dS_ij = P_ij (dO_i . v_j - delta_i),   delta_i = dO_i . O_i
        dQ_i  = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i

    summed over the query heads of a key/value head (grouped-query
    attention). Rows with lse = -inf (no attended key) contribute nothing.
    `key_bias` enters the scores as in the forward; it gets no gradient.

    Example:
    ```mlir
    %dq, %dk, %dv = attn.attention_grad %q, %k, %v, %o, %lse, %do
        pattern(#attn.local<window = 256>)
        : tensor<1x8x?x64xf32>, tensor<1x8x?x64xf32>, tensor<1x8x?x64xf32>,
          tensor<1x8x?x64xf32>, tensor<1x8x?xf32>, tensor<1x8x?x64xf32>
        -> tensor<1x8x?x64xf32>, tensor<1x8x?x64xf32>, tensor<1x8x?x64xf32>
    ```
  }];
  let arguments = (ins Attn_FloatTensor:$query, Attn_FloatTensor:$key,
                       Attn_FloatTensor:$value, Attn_FloatTensor:$output,
                       RankedTensorOf<[F32]>:$lse,
                       Attn_FloatTensor:$grad_output,
                       Optional<Attn_LengthsTensor>:$lengths,
                       Optional<RankedTensorOf<[F32]>>:$key_bias,
                       Attn_AnyPattern:$pattern,
                       OptionalAttr<F64Attr>:$scale);
  let results = (outs Attn_FloatTensor:$grad_query, Attn_FloatTensor:$grad_key,
                      Attn_FloatTensor:$grad_value);
  let assemblyFormat = [{
    $query `,` $key `,` $value `,` $output `,` $lse `,` $grad_output
    (`lengths` `(` $lengths^ `:` type($lengths) `)`)?
    (`key_bias` `(` $key_bias^ `:` type($key_bias) `)`)?
    `pattern` `(` $pattern `)` attr-dict `:` type($query) `,` type($key) `,`
    type($value) `,` type($output) `,` type($lse) `,` type($grad_output)
    `->` type(results)
  }];
  let hasVerifier = 1;
  let extraClassDeclaration = [{
    /// The softmax scale: the attribute, or 1/sqrt(head_dim).
    double getEffectiveScale();
  }];
}

def Attn_GradInitOp : Attn_Op<"grad_init"> {
  let summary = "start a backward pass: delta = rowsum(dO * O), zero gradients";
  let description = [{
    Writes `delta [B,H,Lq]` (f32) = `sum_d grad_output * output` per row and
    sets `dq`, `dk` and `dv` to 0. Destination-style like `attn.init_state`:
    on tensors it returns `delta, dq, dk, dv`; on memrefs it writes in place.
  }];
  let arguments = (ins AnyShaped:$output, AnyShaped:$grad_output,
                       AnyShaped:$delta, AnyShaped:$dq, AnyShaped:$dk,
                       AnyShaped:$dv);
  let results = (outs Variadic<AnyRankedTensor>:$results);
  let assemblyFormat = [{
    $output `,` $grad_output `outs` `(` $delta `,` $dq `,` $dk `,` $dv `)`
    attr-dict `:` type($output) `,` type($grad_output) `,` type($delta) `,`
    type($dq) `,` type($dk) `,` type($dv) (`->` type($results)^)?
  }];
  let hasVerifier = 1;
}

def Attn_ComponentGradOp : Attn_Op<"component_grad",
                                   [AttrSizedOperandSegments]> {
  let summary = "add one dense component's pairs to the gradients";
  let description = [{
    For every pair (i, j) of the component (see `#attn.component`), with
    `p = exp(s - lse_i)` and `ds = p (dO_i . v_j - delta_i)`, adds
    `p dO_i` to `dv_j`, `scale ds k_j` to `dq_i` and `scale ds q_i` to `dk_j`.
    The components of a pattern add up to its multiplicity, as in the
    forward. `origins` as for `attn.component`. Destination-style: on tensors
    it returns `dq, dk, dv`.
  }];
  let arguments = (ins AnyShaped:$query, AnyShaped:$key, AnyShaped:$value,
                       AnyShaped:$grad_output, AnyShaped:$lse,
                       AnyShaped:$delta,
                       Optional<AnyShaped>:$lengths,
                       Optional<AnyShaped>:$key_bias,
                       AnyShaped:$dq, AnyShaped:$dk, AnyShaped:$dv,
                       Variadic<Index>:$origins,
                       Attn_ComponentAttr:$component, F64Attr:$scale);
  let results = (outs Variadic<AnyRankedTensor>:$results);
  let assemblyFormat = [{
    $query `,` $key `,` $value `,` $grad_output `,` $lse `,` $delta
    (`lengths` `(` $lengths^ `:` type($lengths) `)`)?
    (`key_bias` `(` $key_bias^ `:` type($key_bias) `)`)?
    `grads` `(` $dq `,` $dk `,` $dv `)`
    (`origins` `(` $origins^ `)`)? $component attr-dict `:`
    type($query) `,` type($key) `,` type($value) `,` type($grad_output) `,`
    type($lse) `,` type($delta) `,` type($dq) `,` type($dk) `,` type($dv)
    (`->` type($results)^)?
  }];
  let hasVerifier = 1;
}

def Attn_TileGradOp : Attn_Op<"tile_grad", [AttrSizedOperandSegments]> {
  let summary = "gradient contributions of one (row tile, key tile) block";
  let description = [{
    The backward counterpart of `attn.tile_update`: the same block of rows
    `t_q in [row_begin, row_end)` and keys `t_k in [key_begin, key_end)` of
    a component's group, adding its pairs to `dq`, `dk` and `dv` (see
    `attn.component_grad`). Only blocks marked `masked` test the band and
    filters per element.
  }];
  let arguments = (ins AnyMemRef:$query, AnyMemRef:$key, AnyMemRef:$value,
                       AnyMemRef:$grad_output, AnyMemRef:$lse,
                       AnyMemRef:$delta,
                       Optional<AnyMemRef>:$lengths,
                       Optional<AnyMemRef>:$key_bias,
                       AnyMemRef:$dq, AnyMemRef:$dk, AnyMemRef:$dv,
                       Index:$batch, Index:$head, Index:$group_base,
                       Index:$row_begin, Index:$row_end,
                       Index:$key_begin, Index:$key_end,
                       Variadic<Index>:$origins,
                       Attn_ComponentAttr:$component, F64Attr:$scale,
                       UnitAttr:$masked);
  let assemblyFormat = [{
    $query `,` $key `,` $value `,` $grad_output `,` $lse `,` $delta
    (`lengths` `(` $lengths^ `:` type($lengths) `)`)?
    (`key_bias` `(` $key_bias^ `:` type($key_bias) `)`)?
    `grads` `(` $dq `,` $dk `,` $dv `)`
    `at` `[` $batch `,` $head `,` $group_base `]`
    `rows` `[` $row_begin `,` $row_end `)` `keys` `[` $key_begin `,` $key_end `)`
    (`origins` `(` $origins^ `)`)? $component attr-dict `:` type($query) `,`
    type($key) `,` type($value) `,` type($grad_output) `,` type($lse) `,`
    type($delta) `,` type($dq) `,` type($dk) `,` type($dv)
  }];
}

def Attn_RingExchangeOp : Attn_Op<"ring_exchange"> {
  let summary = "one ring step's transfer of key/value rows between ranks";
  let description = [{
    At ring step `step`, sends the rows `send_rows` of this rank's `key` and
    `value` chunks to rank `send_to` and receives rank `recv_from`'s rows
    `recv_rows` into `key_buffer` and `value_buffer` at the same local row
    indices (other rows are left as they are and never attended). `-1`
    means nothing to send or receive. The row sets hold one
    `array<i64: start, len, count, pitch, ...>` per kv head, or a single one
    for every kv head: `count` runs of `len` rows, `pitch` rows apart.
    Emitted by attn-insert-ring-comm; the runtime performs it with NCCL
    (GPU) or its in-process transport (CPU).
  }];
  let arguments = (ins AnyMemRef:$key, AnyMemRef:$value,
                       AnyMemRef:$key_buffer, AnyMemRef:$value_buffer,
                       I64Attr:$step, I64Attr:$send_to, I64Attr:$recv_from,
                       ArrayAttr:$send_rows, ArrayAttr:$recv_rows);
  let assemblyFormat = [{
    $key `,` $value `into` $key_buffer `,` $value_buffer attr-dict `:`
    type($key) `,` type($value) `,` type($key_buffer) `,` type($value_buffer)
  }];
}

#endif // ATTN_OPS
