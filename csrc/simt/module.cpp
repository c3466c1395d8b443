// The Python module `opd_ext._simt`: the CUDA bindings of csrc/cuda compiled as host C++ and run
// by the SIMT emulator, registered as the operator library `opd_ext_emu` (same schemas as
// opd_ext, CPU tensors), plus the emulator's settings. opd_ext.testing.emulated_cuda() routes
// opd_ext's ops here.
#include <Python.h>

#include <torch/library.h>

#include <string>

#include "op_schemas.h"
#include "simt/simt.h"

TORCH_LIBRARY(opd_ext_emu, m) { opd_ext::define_op_schemas(m); }

namespace {

using opd::simt::Schedule;

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::forward: return "forward";
    case Schedule::reverse: return "reverse";
    case Schedule::random: return "random";
  }
  return "?";
}

PyObject* get_config(PyObject*, PyObject*) {
  const opd::simt::Config& c = opd::simt::config();
  const opd::simt::DeviceProfile& d = c.device;
  return Py_BuildValue("{s:s,s:s,s:K,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "device", d.name.c_str(), "schedule",
                       schedule_name(c.schedule), "seed", static_cast<unsigned long long>(c.seed), "sm_count",
                       d.sm_count, "max_threads_per_sm", d.max_threads_per_sm, "max_blocks_per_sm", d.max_blocks_per_sm,
                       "registers_per_sm", d.registers_per_sm, "registers_per_thread", d.registers_per_thread,
                       "shared_bytes_per_sm", d.shared_bytes_per_sm, "max_shared_bytes_per_block",
                       d.max_shared_bytes_per_block);
}

// configure(device=None, schedule=None, seed=None, sm_count=None, registers_per_thread=None):
// None leaves a setting as it is; `device` loads a profile's SM count and limits.
PyObject* configure(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"device", "schedule", "seed", "sm_count", "registers_per_thread", nullptr};
  const char* device = nullptr;
  const char* schedule = nullptr;
  PyObject* seed = Py_None;
  PyObject* sm_count = Py_None;
  PyObject* registers = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|zzOOO", const_cast<char**>(names), &device, &schedule, &seed,
                                   &sm_count, &registers)) {
    return nullptr;
  }
  opd::simt::Config next = opd::simt::config();
  try {
    if (device != nullptr) next.device = opd::simt::device_profile(device);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  if (schedule != nullptr) {
    const std::string s = schedule;
    if (s == "forward") {
      next.schedule = Schedule::forward;
    } else if (s == "reverse") {
      next.schedule = Schedule::reverse;
    } else if (s == "random") {
      next.schedule = Schedule::random;
    } else {
      PyErr_Format(PyExc_ValueError, "schedule must be 'forward', 'reverse' or 'random', got '%s'", schedule);
      return nullptr;
    }
  }
  auto read_int = [](PyObject* o, const char* name, long long lo, long long* out) -> bool {
    if (o == Py_None) return true;
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return false;
    if (v < lo) {
      PyErr_Format(PyExc_ValueError, "%s must be >= %lld, got %lld", name, lo, v);
      return false;
    }
    *out = v;
    return true;
  };
  long long value = -1;
  if (!read_int(seed, "seed", 0, &value)) return nullptr;
  if (value >= 0) next.seed = static_cast<uint64_t>(value);
  value = -1;
  if (!read_int(sm_count, "sm_count", 1, &value)) return nullptr;
  if (value >= 1) next.device.sm_count = static_cast<int>(value);
  value = -1;
  if (!read_int(registers, "registers_per_thread", 1, &value)) return nullptr;
  if (value >= 1) next.device.registers_per_thread = static_cast<int>(value);
  opd::simt::config() = next;
  Py_RETURN_NONE;
}

PyObject* get_counters(PyObject*, PyObject*) {
  const opd::simt::Counters& c = opd::simt::counters();
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "launches", (unsigned long long)c.launches, "blocks",
                       (unsigned long long)c.blocks, "threads", (unsigned long long)c.threads, "barriers",
                       (unsigned long long)c.barriers, "warp_ops", (unsigned long long)c.warp_ops, "atomics",
                       (unsigned long long)c.atomics, "switches", (unsigned long long)c.switches, "shared_bytes_peak",
                       (unsigned long long)c.shared_bytes_peak);
}

PyObject* reset_counters(PyObject*, PyObject*) {
  opd::simt::counters() = {};
  Py_RETURN_NONE;
}

PyObject* poison_byte(PyObject*, PyObject*) { return PyLong_FromLong(opd::simt::poison_byte()); }

PyMethodDef methods[] = {
    {"config", get_config, METH_NOARGS, "The emulator's current settings."},
    {"configure", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(configure)), METH_VARARGS | METH_KEYWORDS,
     "configure(device=None, schedule=None, seed=None, sm_count=None, registers_per_thread=None)"},
    {"counters", get_counters, METH_NOARGS, "Launches, blocks, threads, barriers, warp ops, ... run so far."},
    {"reset_counters", reset_counters, METH_NOARGS, "Zeroes the counters."},
    {"poison_byte", poison_byte, METH_NOARGS, "The byte fresh shared memory and workspaces are filled with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_simt", "opd_ext's CUDA kernels on the SIMT emulator", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__simt(void) { return PyModule_Create(&module_def); }
