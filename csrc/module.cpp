// The Python module `opd_ext._C`. Importing it runs the static TORCH_LIBRARY registrations; its
// one function reports how this binary was built (opd_ext.build_info()). Built against the limited
// C API (Py_LIMITED_API, an abi3 module), so only the stable ABI's functions are available here.
#include <Python.h>

#include <string>

#include "opd/cuda/limits.h"
#include "opd/drift.h"

#ifndef OPD_WITH_CUDA
#define OPD_WITH_CUDA 0
#endif

namespace {

// The constants the Python layer must agree with, read from the headers that define them rather
// than mirrored by hand: the CUDA streaming top-k limit and the drift stop-reason codes.
PyObject* kernel_limits(PyObject*, PyObject*) {
  // clang-format off: one key and its value per line
  return Py_BuildValue("{s:i,s:{s:i,s:i,s:i,s:i,s:i,s:i}}",
                       "max_streaming_topk", opd::cuda::kMaxStreamingTopK,
                       "drift_stop_reasons",
                       "running", static_cast<int>(opd::kRunning),
                       "weight_exhausted", static_cast<int>(opd::kWeightExhausted),
                       "patience", static_cast<int>(opd::kPatience),
                       "budget", static_cast<int>(opd::kBudget),
                       "finished", static_cast<int>(opd::kFinished),
                       "repetition", static_cast<int>(opd::kRepetition));
  // clang-format on
}

PyObject* build_config(PyObject*, PyObject*) {
  // clang-format off: one key and its value per line
  return Py_BuildValue("{s:s,s:O,s:s,s:s,s:s,s:s,s:s}",
                       "torch_version", OPD_BUILD_TORCH_VERSION,
                       "with_cuda", OPD_WITH_CUDA ? Py_True : Py_False,
                       "cuda_archs", OPD_BUILD_CUDA_ARCHS,
                       "nvcc_version", OPD_BUILD_NVCC_VERSION,
                       "cuda_mode", OPD_BUILD_CUDA_MODE,
                       "compiler", __VERSION__,
                       "py_limited_api", OPD_BUILD_PY_LIMITED_API);
  // clang-format on
}

PyMethodDef methods[] = {
    {"build_config", build_config, METH_NOARGS, "How this extension binary was built."},
    {"kernel_limits", kernel_limits, METH_NOARGS, "Constants of the kernels the Python layer must agree with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "opd_ext compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
