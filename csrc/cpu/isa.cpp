// The run-time ISA choice of the CPU row kernels (isa.h): the CPU's best, MNN_FAST_CPU_ISA, or set_isa.
#ifndef MNN_FAST_NO_PYTHON
#include <Python.h>
#endif

#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace mnn_fast {
namespace cpu {
namespace {

constexpr const char* kNames[kIsaCount] = {"sse2", "avx2", "avx512"};

Isa best_usable() {
  for (int k = kIsaCount - 1; k > 0; --k) {
    if (isa_unavailable(static_cast<Isa>(k)).empty()) return static_cast<Isa>(k);
  }
  return Isa::kSse2;
}

std::string env_note;  // written once, before any reader, by initial()

Isa initial() {
  const Isa best = best_usable();
  const char* env = std::getenv("MNN_FAST_CPU_ISA");
  if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") return best;
  for (int k = 0; k < kIsaCount; ++k) {
    if (env != std::string(kNames[k])) continue;
    const std::string why = isa_unavailable(static_cast<Isa>(k));
    if (why.empty()) return static_cast<Isa>(k);
    env_note = std::string("MNN_FAST_CPU_ISA=") + env + " ignored: " + why;
    return best;
  }
  env_note = std::string("MNN_FAST_CPU_ISA=") + env + " ignored: expected auto, sse2, avx2 or avx512";
  return best;
}

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(initial())};
  return value;
}

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

std::string isa_unavailable(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::kSse2:
      return "";
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") ? "" : "this CPU has no AVX2";
    case Isa::kAvx512:
      // The tile kernels use AVX-512 F (and DQ for the float bit operations); cpu_supports also
      // checks that the OS saves the AVX-512 registers.
      if (!__builtin_cpu_supports("avx512f")) return "this CPU has no AVX-512 (avx512f)";
      if (!__builtin_cpu_supports("avx512dq")) return "this CPU has AVX-512 F but not DQ";
      return "";
  }
  return "unknown ISA";
#else
  return isa == Isa::kSse2 ? "" : "not an x86 CPU";
#endif
}

Isa isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

std::string set_isa(const std::string& name) {
  const std::string previous = isa_name(isa());
  if (name == "auto") {
    current().store(static_cast<int>(best_usable()));
    return previous;
  }
  for (int k = 0; k < kIsaCount; ++k) {
    if (name != kNames[k]) continue;
    const std::string why = isa_unavailable(static_cast<Isa>(k));
    TORCH_CHECK_VALUE(why.empty(), "set_cpu_isa: ", name, " cannot run here: ", why);
    current().store(k);
    return previous;
  }
  TORCH_CHECK_VALUE(false, "set_cpu_isa: name must be 'auto', 'sse2', 'avx2' or 'avx512', got '", name, "'");
}

const std::string& isa_env_note() {
  isa();  // the note is written when the choice is first made
  return env_note;
}

}  // namespace cpu
}  // namespace mnn_fast

// ---------------------------------------------------------------- Python: mnn_fast._C functions
// Left out of the plain op library (MNN_FAST_NO_PYTHON, examples/cpp), which has no Python to call them.
#ifndef MNN_FAST_NO_PYTHON
// Plain module functions, not torch ops: they take and return no tensors (mnn_fast/engine/isa.py wraps them).

namespace {

// No Python data symbol (PyExc_*, Py_None) may appear in this library: a C++ program without libpython
// loads mnn_fast._C with RTLD_LAZY (examples/cpp), which defers functions but must resolve data at load.
PyObject* builtin(const char* name) { return PyDict_GetItemString(PyEval_GetBuiltins(), name); }

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(mnn_fast::cpu::isa_name(mnn_fast::cpu::isa())); }

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_Format(builtin("TypeError"), "set_cpu_isa: name must be a str, got %s", Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  try {
    return PyUnicode_FromString(mnn_fast::cpu::set_isa(PyUnicode_AsUTF8(arg)).c_str());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(builtin("ValueError"), e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* py_cpu_isa_status(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (int k = 0; k < mnn_fast::cpu::kIsaCount; ++k) {
    const auto isa = static_cast<mnn_fast::cpu::Isa>(k);
    const std::string why = mnn_fast::cpu::isa_unavailable(isa);
    PyObject* value = why.empty() ? Py_BuildValue("") : PyUnicode_FromString(why.c_str());
    PyDict_SetItemString(out, mnn_fast::cpu::isa_name(isa), value);
    Py_DECREF(value);
  }
  return out;
}

PyObject* py_cpu_isa_env_note(PyObject*, PyObject*) { return PyUnicode_FromString(mnn_fast::cpu::isa_env_note().c_str()); }

}  // namespace

PyMethodDef kMnnFastIsaMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The SIMD instruction set the CPU row kernels use: 'sse2', 'avx2' or 'avx512'."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Use another ISA ('auto' = the best usable); returns the previous one."},
    {"cpu_isa_status", py_cpu_isa_status, METH_NOARGS, "{name: None if usable here, else why not}."},
    {"cpu_isa_env_note", py_cpu_isa_env_note, METH_NOARGS, "Why MNN_FAST_CPU_ISA was not followed ('' if it was or is unset)."},
    {nullptr, nullptr, 0, nullptr}};
#endif  // MNN_FAST_NO_PYTHON
