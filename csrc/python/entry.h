// Helpers shared by the mnn_fast._serving entries (serving.cpp: one per op and the grouped Linear
// forward; sequential.cpp: the sequential executor's forward): argument conversion that raises a
// TypeError naming the function and argument, the GIL released around kernels, the ops' typed
// dispatcher handles, and the switch-side routing both forwards start with.
#pragma once

#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mnn_fast {
namespace serving {

using at::Tensor;

// Argument conversion: a TypeError naming the function and the argument, never a crash.
[[noreturn]] inline void bad_argument(const char* fn, const char* name, const char* expected, PyObject* got) {
  throw torch::TypeError(std::string(fn) + ": " + name + " must be " + expected + ", got " + Py_TYPE(got)->tp_name);
}

inline const Tensor& tensor_arg(const char* fn, const char* name, PyObject* obj) {
  if (!THPVariable_Check(obj)) bad_argument(fn, name, "a Tensor", obj);
  return THPVariable_Unpack(obj);
}

inline std::optional<Tensor> optional_tensor_arg(const char* fn, const char* name, PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(fn, name, obj);
}

inline std::vector<Tensor> tensor_list_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) bad_argument(fn, name, "a list of Tensors", obj);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  std::vector<Tensor> out;
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) bad_argument(fn, name, "a list of Tensors", items[i]);
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return out;
}

inline double float_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyFloat_Check(obj) && !PyLong_Check(obj)) bad_argument(fn, name, "a float", obj);
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();  // an int too large for a double
  return value;
}

inline int64_t int_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyLong_Check(obj) || PyBool_Check(obj)) bad_argument(fn, name, "an int", obj);
  const int64_t value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) throw python_error();  // OverflowError: beyond int64
  return value;
}

inline bool bool_arg(const char* fn, const char* name, PyObject* obj) {
  if (!PyBool_Check(obj)) bad_argument(fn, name, "a bool", obj);
  return obj == Py_True;
}

inline void check_count(const char* fn, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs != want) {
    throw torch::TypeError(std::string(fn) + " takes " + std::to_string(want) + " arguments, got " + std::to_string(nargs));
  }
}

// The GIL released for the kernel's run, and taken back however it ends.
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  ~WithoutGil() { PyEval_RestoreThread(state_); }
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;

 private:
  PyThreadState* state_;
};

template <typename Sig>
inline c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline PyObject* wrap(const Tensor& t) { return THPVariable_Wrap(t); }

template <typename... Ts>
inline PyObject* wrap(const std::tuple<Ts...>& tensors) {
  PyObject* out = PyTuple_New(sizeof...(Ts));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  std::apply([&](const auto&... t) { (PyTuple_SET_ITEM(out, i++, THPVariable_Wrap(t)), ...); }, tensors);
  return out;
}

inline PyObject* wrap(const std::vector<Tensor>& tensors) {
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(tensors.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), THPVariable_Wrap(tensors[i]));
  return out;
}

// The arguments both forward entries start with: (z, x, routing, C, threshold, top_k, group_offsets,
// group_classes); z is left to the caller, which answers None where it is not the logits it expects.
struct ForwardArgs {
  const Tensor& x;
  bool want_routing;
  int64_t C;
  double threshold;
  int64_t top_k;
  std::optional<Tensor> expert_offsets, expert_classes;
};

inline ForwardArgs forward_args(const char* fn, PyObject* const* args) {
  ForwardArgs a{tensor_arg(fn, "x", args[1]),
                bool_arg(fn, "routing", args[2]),
                int_arg(fn, "C", args[3]),
                float_arg(fn, "threshold", args[4]),
                int_arg(fn, "top_k", args[5]),
                optional_tensor_arg(fn, "group_offsets", args[6]),
                optional_tensor_arg(fn, "group_classes", args[7])};
  if (a.expert_offsets.has_value() != a.expert_classes.has_value()) {
    throw torch::TypeError(std::string(fn) + ": group_offsets and group_classes must both be Tensors or both None");
  }
  return a;
}

// The recombine tables both forwards end with (class group offsets, classes, log spread), from args[first:].
struct RecombineTables {
  const Tensor& class_offsets;
  const Tensor& class_groups;
  const Tensor& log_spread;
};

inline RecombineTables recombine_tables(const char* fn, PyObject* const* args, int first) {
  return {tensor_arg(fn, "class_group_offsets", args[first]), tensor_arg(fn, "class_group_classes", args[first + 1]),
          tensor_arg(fn, "log_spread", args[first + 2])};
}

// recombine(log_probs, logits, offsets, tables..., sample_offsets, sample_rows) on a forward's routing,
// the GIL released.
inline Tensor recombine_routed(const Tensor& log_probs, at::TensorList logits, const Tensor& offsets,
                               const RecombineTables& t, const Tensor& sample_offsets, const Tensor& sample_rows) {
  static const auto recombine = handle<Tensor(const Tensor&, at::TensorList, const Tensor&, const Tensor&,
                                              const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
      "mnn_fast::recombine");
  WithoutGil no_gil;
  return recombine.call(log_probs, logits, offsets, t.class_offsets, t.class_groups, t.log_spread, sample_offsets,
                        sample_rows);
}

// The switch's side of a forward: log_probs and probs of z (float32), each expert's score (probs,
// or group_scores for multi-class groups), then route. The GIL is released meanwhile.
struct SwitchRouting {
  Tensor log_probs, counts, offsets, perm, sample_offsets, sample_rows;
};

inline SwitchRouting route_switch(const Tensor& z, double threshold, int64_t top_k,
                                  const std::optional<Tensor>& expert_offsets,
                                  const std::optional<Tensor>& expert_classes) {
  static const auto softmax_rows = handle<std::tuple<Tensor, Tensor>(const Tensor&)>("mnn_fast::softmax_rows");
  static const auto group_scores =
      handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("mnn_fast::group_scores");
  using Routed = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
  static const auto route = handle<Routed(const Tensor&, double, int64_t)>("mnn_fast::route");
  SwitchRouting r;
  WithoutGil no_gil;
  Tensor probs;
  std::tie(r.log_probs, probs) = softmax_rows.call(z.scalar_type() == at::kFloat ? z : z.to(at::kFloat));
  const Tensor scores = expert_offsets ? group_scores.call(probs, *expert_offsets, *expert_classes) : probs;
  std::tie(r.counts, r.offsets, r.perm, r.sample_offsets, r.sample_rows) = route.call(scores, threshold, top_k);
  return r;
}

// What a forward entry returns: out alone when the caller wants no routing and out is complete,
// else (out, outputs, log_probs, counts, offsets, perm, sample_offsets, sample_rows), None for an
// absent out or outputs (outputs: a Tensor, or a list with None for experts without rows).
inline PyObject* forward_result(const std::optional<Tensor>& out, PyObject* outputs, const SwitchRouting& r,
                                bool want_routing) {
  if (out.has_value() && !want_routing) return THPVariable_Wrap(*out);
  PyObject* result = PyTuple_New(8);
  if (result == nullptr) return nullptr;
  const auto set = [&](Py_ssize_t i, const std::optional<Tensor>& t) {
    PyObject* item = t.has_value() ? THPVariable_Wrap(*t) : (Py_INCREF(Py_None), Py_None);
    PyTuple_SET_ITEM(result, i, item);
  };
  set(0, out);
  Py_INCREF(outputs);
  PyTuple_SET_ITEM(result, 1, outputs);
  set(2, r.log_probs);
  set(3, r.counts);
  set(4, r.offsets);
  set(5, r.perm);
  set(6, r.sample_offsets);
  set(7, r.sample_rows);
  return result;
}

}  // namespace serving
}  // namespace mnn_fast
