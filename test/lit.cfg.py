# lit configuration of the attn tests: dialect round trips and diagnostics,
# pass tests, spec tests (JSON in, IR or error out) and CPU numerics
# (compile, run, compare with the double-precision reference).
import os

import lit.formats
from lit.llvm import llvm_config

config.name = "attn"
config.test_format = lit.formats.ShTest(not llvm_config.use_lit_shell)
config.suffixes = [".mlir", ".json", ".test"]
config.excludes = ["lit.cfg.py", "lit.site.cfg.py", "Inputs", "CMakeLists.txt"]
config.substitutions.append(("%python", "/usr/bin/python3"))
config.test_source_root = os.path.dirname(__file__)
config.test_exec_root = os.path.join(config.attn_obj_root, "test")
config.environment["FILECHECK_OPTS"] = "--enable-var-scope"

llvm_config.with_system_environment(["HOME", "PATH", "TMPDIR"])
llvm_config.use_default_substitutions()
config.substitutions.append(("%examples", os.path.join(config.attn_source_dir, "examples")))
config.substitutions.append(("%attn_src", config.attn_source_dir))
llvm_config.add_tool_substitutions(
    ["attn-opt", "attn-compile", "attn-run", "attn-check"], [config.attn_tools_dir])
llvm_config.add_tool_substitutions(["FileCheck", "not", "count", "split-file", "mlir-tblgen"],
                                   [config.llvm_tools_dir])

# GPU packages need ptxas (the CUDA toolkit), found like attn-compile does.
for ptxas in [os.path.join(os.environ.get(v, ""), "bin", "ptxas")
              for v in ("CUDA_ROOT", "CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda/bin/ptxas"]:
    if os.path.isfile(ptxas) and os.access(ptxas, os.X_OK):
        config.available_features.add("ptxas")
        break
config.excludes.append("gpu-package.test.d")
