// The Python module `opd_ext._C`. Importing it runs the static TORCH_LIBRARY registrations; its
// one function reports how this binary was built (opd_ext.build_info()). Built against the limited
// C API (Py_LIMITED_API, an abi3 module), so only the stable ABI's functions are available here.
#include <Python.h>

#include <string>

#ifndef OPD_WITH_CUDA
#define OPD_WITH_CUDA 0
#endif

namespace {

PyObject* build_config(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:O,s:s,s:s,s:s,s:s,s:s}",
                       "torch_version", OPD_BUILD_TORCH_VERSION,
                       "with_cuda", OPD_WITH_CUDA ? Py_True : Py_False,
                       "cuda_archs", OPD_BUILD_CUDA_ARCHS,
                       "nvcc_version", OPD_BUILD_NVCC_VERSION,
                       "cuda_mode", OPD_BUILD_CUDA_MODE,
                       "compiler", __VERSION__,
                       "py_limited_api", OPD_BUILD_PY_LIMITED_API);
}

PyMethodDef methods[] = {
    {"build_config", build_config, METH_NOARGS, "How this extension binary was built."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "opd_ext compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
