// The opd_ext operator library: every schema (csrc/op_schemas.h) registered in one block. Kernels
// register themselves per backend with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(opd_ext, m) { opd_ext::define_op_schemas(m); }
