//===- AttnAttrs.td - attention pattern attributes ---------*- tablegen -*-===//
//
// Pattern attributes: each defines the multiplicity m(h, i, j) of a query/key
// pair (docs/Semantics.md). Leaves describe one structure, `sum`, `union` and
// `intersect` combine patterns. `#attn.component` is the compiler's internal
// form of one dense component after attn-decompose.
//
//===----------------------------------------------------------------------===//

#ifndef ATTN_ATTRS
#define ATTN_ATTRS

include "attn/Dialect/Attn/IR/AttnDialect.td"
include "mlir/IR/AttrTypeBase.td"
include "mlir/IR/BuiltinAttributeInterfaces.td"

def Attn_PatternAttrInterface : AttrInterface<"PatternAttrInterface"> {
  let cppNamespace = "::mlir::attn";
  let description = [{
    Implemented by every attribute that is an attention pattern. It lets op
    verifiers and passes accept any pattern without listing them.
  }];
  let methods = [
    InterfaceMethod<"Whether the pattern reads the per-sequence `lengths`.",
      "bool", "usesLengths", (ins)>,
  ];
}

class Attn_Attr<string name, string attrMnemonic, list<Trait> traits = []>
    : AttrDef<Attn_Dialect, name, traits> {
  let mnemonic = attrMnemonic;
}

class Attn_PatternAttr<string name, string mnemonic>
    : Attn_Attr<name, mnemonic, [DeclareAttrInterfaceMethods<Attn_PatternAttrInterface>]>;

def Attn_FullAttr : Attn_PatternAttr<"Full", "full"> {
  let summary = "every query attends every key: m = 1";
}

def Attn_CausalAttr : Attn_PatternAttr<"Causal", "causal"> {
  let summary = "m = 1 when j <= i (bottom-right aligned)";
}

def Attn_LocalAttr : Attn_PatternAttr<"Local", "local"> {
  let summary = "sliding window";
  let description = [{
    Causal: `m = 1` when `i - W < j <= i`. Two-sided (`causal = false`):
    `m = 1` when `|i - j| < W`. Example: `#attn.local<window = 128>`.
  }];
  let parameters = (ins "int64_t":$window,
                        DefaultValuedParameter<"bool", "true">:$causal);
  let assemblyFormat = "`<` struct(params) `>`";
  let genVerifyDecl = 1;
}

def Attn_StridedAttr : Attn_PatternAttr<"Strided", "strided"> {
  let summary = "strided attention of Child et al. 2019";
  let description = [{
    `m = 1` when `j <= i` and (`i - j < local` or `(i - j) % stride == 0`).
    Example: `#attn.strided<stride = 128, local = 128>`.
  }];
  let parameters = (ins "int64_t":$stride, "int64_t":$local);
  let assemblyFormat = "`<` struct(params) `>`";
  let genVerifyDecl = 1;
}

def Attn_DilatedAttr : Attn_PatternAttr<"Dilated", "dilated"> {
  let summary = "one LongNet branch: segment w, dilation rate r";
  let description = [{
    `m = 1` when `i / w == j / w`, `i % r == o` and `j % r == o`, where
    `o = h % r` with `head_offset` and `0` otherwise; with `causal`, also
    `j <= i`. The rate must divide the segment. Example:
    `#attn.dilated<segment = 2048, rate = 4, head_offset = true>`.
  }];
  let parameters = (ins "int64_t":$segment, "int64_t":$rate,
                        DefaultValuedParameter<"bool", "false">:$head_offset,
                        DefaultValuedParameter<"bool", "false">:$causal);
  let assemblyFormat = "`<` struct(params) `>`";
  let genVerifyDecl = 1;
}

def Attn_TokenizedAttr : Attn_PatternAttr<"Tokenized", "tokenized"> {
  let summary = "variable-length sequences padded to L";
  let description = [{
    For batch row `b`, keys `j >= lengths[b]` are padding and rows
    `i >= lengths[b]` give 0; every other pair has `m = 1`. With `dedup`,
    backends may attend over unique token ids with a `log(count)` bias, which
    is exact when K and V depend only on the id. Needs the `lengths` operand.
    Example: `#attn.tokenized<dedup = true>`.
  }];
  let parameters = (ins DefaultValuedParameter<"bool", "false">:$dedup);
  let assemblyFormat = "`<` struct(params) `>`";
}

class Attn_CombinatorAttr<string name, string mnemonic, string rule>
    : Attn_PatternAttr<name, mnemonic> {
  let summary = rule;
  let parameters = (ins "ArrayAttr":$patterns);
  let assemblyFormat = "`<` $patterns `>`";
  let genVerifyDecl = 1;
}

def Attn_SumAttr : Attn_CombinatorAttr<"Sum", "sum",
    "m = sum of the members' multiplicities (LongNet's branch mixing)">;
def Attn_UnionAttr : Attn_CombinatorAttr<"Union", "union",
    "m = 1 when any member attends the pair">;
def Attn_IntersectAttr : Attn_CombinatorAttr<"Intersect", "intersect",
    "m = 1 when every member attends the pair">;

def Attn_ComponentAttr : Attn_Attr<"Component", "component"> {
  let summary = "one dense component of a decomposed pattern";
  let description = [{
    Query rows and keys are grouped by position `p` (a query row `i` sits at
    `p = i + Lk - Lq`, a key `j` at `p = j`). A group holds the positions
    `p = s * segment + c + period * t`, `t = 0, 1, ...` of residue class `c` of
    segment `s` (no segments when `segment = 0`). Residue `all` takes every
    class `0 <= c < period`, `head` takes `c = h % period` and a number takes
    that class. The general head residue `head(M, o, d)` takes
    `c = (h % M - o) / d` for the heads where `h % M - o` is a non-negative
    multiple of `d` below `d * period`; other heads have no pairs (the striped
    ring layout maps LongNet's head offsets onto ranks this way). `head` is
    `head(period, 0, 1)`. Inside a group, row `t_q` attends key `t_k` when
    `lo <= t_q - t_k <= hi` (the band, `-inf`/`inf` for no bound), keys and rows
    lie within `lengths[b]` when `lengths` is set, the pair is in every
    `include` pattern and in no `exclude` pattern.

    Example (a dilated branch, causal):
    `#attn.component<period = 4, residue = head, segment = 2048, band = [0, inf]>`
  }];
  let parameters = (ins "int64_t":$period, "int64_t":$residue,
                        "int64_t":$segment, "int64_t":$bandLo,
                        "int64_t":$bandHi, "bool":$useLengths,
                        "ArrayAttr":$include, "ArrayAttr":$exclude,
                        DefaultValuedParameter<"int64_t", "0">:$headMod,
                        DefaultValuedParameter<"int64_t", "0">:$headOffset,
                        DefaultValuedParameter<"int64_t", "1">:$headDiv);
  let hasCustomAssemblyFormat = 1;
  let genVerifyDecl = 1;
  let extraClassDeclaration = [{
    /// Residue value meaning every class 0 <= c < period.
    static constexpr int64_t kAllResidues = -1;
    /// Residue value meaning the class h % period.
    static constexpr int64_t kHeadResidue = -2;
    /// Band bounds standing for -inf and +inf.
    static constexpr int64_t kNegInf = std::numeric_limits<int64_t>::min();
    static constexpr int64_t kPosInf = std::numeric_limits<int64_t>::max();
    /// The residue class head `h` uses, or -1 when the head has no pairs
    /// (only a head residue depends on `h`; `all` gives kAllResidues).
    int64_t classOfHead(int64_t h) const;
    /// True when the residue is the plain `head` (c = h % period).
    bool isPlainHeadResidue() const {
      return getResidue() == kHeadResidue && getHeadMod() == getPeriod() &&
             getHeadOffset() == 0 && getHeadDiv() == 1;
    }
    /// True when every tile needs an element mask (filters cut anywhere).
    bool hasFilters() const { return !getInclude().empty() || !getExclude().empty(); }
  }];
}

#endif // ATTN_ATTRS
