// mnn_fast._serving: the serving path's entries into the mnn_fast ops (mnn_fast/engine/inference_ops.py),
// each a plain CPython function that converts its arguments and calls the op's typed dispatcher
// handle, unboxed. From Python, an OpOverload's C++ callable builds a boxed stack (toIValue per
// argument, list elements included) and dispatches boxed; a one-sample forward makes five such
// calls right after its GEMVs have evicted that code, which cost it ~17 us of ~250 (perf, 1 thread).
// The same kernels run on the same tensors (the dispatcher still picks them, honouring the caller's
// below-autograd region), so the bits are the ops'. The GIL is released while a kernel runs.
// A module of its own, not part of mnn_fast._C: these functions need libtorch_python, which the op
// library must not (C++ programs load _C without Python: examples/cpp). Import mnn_fast._C first,
// which registers the ops this module looks up.
#include <Python.h>

#include <ATen/core/LegacyTypeDispatch.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "entry.h"

namespace {

using namespace mnn_fast::serving;

// Runs the op call without the GIL and wraps what it returns (arguments converted beforehand).
template <typename Call>
PyObject* run(Call&& call) {
  decltype(call()) out;
  {
    WithoutGil no_gil;
    out = call();
  }
  return wrap(out);
}

PyObject* py_softmax_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "softmax_rows";
  check_count(fn, nargs, 1);
  static const auto op = handle<std::tuple<Tensor, Tensor>(const Tensor&)>("mnn_fast::softmax_rows");
  const Tensor& x = tensor_arg(fn, "x", args[0]);
  return run([&] { return op.call(x); });
  END_HANDLE_TH_ERRORS
}

PyObject* py_group_scores(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "group_scores";
  check_count(fn, nargs, 3);
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("mnn_fast::group_scores");
  const Tensor& probs = tensor_arg(fn, "probs", args[0]);
  const Tensor& offsets = tensor_arg(fn, "group_offsets", args[1]);
  const Tensor& classes = tensor_arg(fn, "group_classes", args[2]);
  return run([&] { return op.call(probs, offsets, classes); });
  END_HANDLE_TH_ERRORS
}

PyObject* py_route(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "route";
  check_count(fn, nargs, 3);
  using Out = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
  static const auto op = handle<Out(const Tensor&, double, int64_t)>("mnn_fast::route");
  const Tensor& scores = tensor_arg(fn, "scores", args[0]);
  const double threshold = float_arg(fn, "threshold", args[1]);
  const int64_t top_k = int_arg(fn, "top_k", args[2]);
  return run([&] { return op.call(scores, threshold, top_k); });
  END_HANDLE_TH_ERRORS
}

PyObject* py_recombine(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "recombine";
  check_count(fn, nargs, 8);
  static const auto op = handle<Tensor(const Tensor&, at::TensorList, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&)>("mnn_fast::recombine");
  const Tensor& logp = tensor_arg(fn, "logp", args[0]);
  const std::vector<Tensor> logits = tensor_list_arg(fn, "logits", args[1]);
  const char* names[] = {"offsets", "group_offsets", "group_classes", "log_spread", "sample_offsets", "sample_rows"};
  const Tensor* rest[6];
  for (int i = 0; i < 6; ++i) rest[i] = &tensor_arg(fn, names[i], args[2 + i]);
  return run([&] { return op.call(logp, logits, *rest[0], *rest[1], *rest[2], *rest[3], *rest[4], *rest[5]); });
  END_HANDLE_TH_ERRORS
}

// segment_linear and segment_linear_experts: x, the weights (one stack, or a list), the biases
// (optional, or a list), offsets, a scalar (parallel_segments, or out_features), perm.
PyObject* py_segment_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "segment_linear";
  check_count(fn, nargs, 6);
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, bool,
                                       const std::optional<Tensor>&)>("mnn_fast::segment_linear");
  const Tensor& weight = tensor_arg(fn, "weight", args[1]);
  const std::optional<Tensor> bias = optional_tensor_arg(fn, "bias", args[2]);
  const bool parallel = bool_arg(fn, "parallel_segments", args[4]);
  const std::optional<Tensor> perm = optional_tensor_arg(fn, "perm", args[5]);
  const Tensor& x = tensor_arg(fn, "x", args[0]);
  const Tensor& offsets = tensor_arg(fn, "offsets", args[3]);
  return run([&] { return op.call(x, weight, bias, offsets, parallel, perm); });
  END_HANDLE_TH_ERRORS
}

PyObject* py_segment_linear_experts(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "segment_linear_experts";
  check_count(fn, nargs, 6);
  static const auto op = handle<Tensor(const Tensor&, at::TensorList, at::TensorList, const Tensor&, int64_t,
                                       const std::optional<Tensor>&)>("mnn_fast::segment_linear_experts");
  const std::vector<Tensor> weights = tensor_list_arg(fn, "weights", args[1]);
  const std::vector<Tensor> biases = tensor_list_arg(fn, "biases", args[2]);
  const int64_t out_features = int_arg(fn, "out_features", args[4]);
  const std::optional<Tensor> perm = optional_tensor_arg(fn, "perm", args[5]);
  const Tensor& x = tensor_arg(fn, "x", args[0]);
  const Tensor& offsets = tensor_arg(fn, "offsets", args[3]);
  return run([&] { return op.call(x, weights, biases, offsets, out_features, perm); });
  END_HANDLE_TH_ERRORS
}

PyObject* py_gather_split(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "gather_split";
  check_count(fn, nargs, 3);
  static const auto op =
      handle<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&)>("mnn_fast::gather_split");
  const Tensor& x = tensor_arg(fn, "x", args[0]);
  const Tensor& perm = tensor_arg(fn, "perm", args[1]);
  const Tensor& offsets = tensor_arg(fn, "offsets", args[2]);
  return run([&] { return op.call(x, perm, offsets); });
  END_HANDLE_TH_ERRORS
}

// A grouped Linear stack's whole forward after the switch, in one call: softmax_rows, group_scores
// (when groups are not one class each), route, each Linear step as segment_linear_experts on the
// active experts' own weight and bias (read from their modules' parameter dicts), the row-wise
// "call" steps (ReLU, ...) through Python, then recombine. The same op calls in the same order as
// the module's step-by-step path, so the same bits; what goes is the Python between them, which a
// one-sample call pays cold right after its GEMVs (~20 us of ~200 at 1 thread).
//
// Arguments: z (the switch's output), x, routing (whether the caller wants the routing back), C
// (the logits width the caller has checked), threshold,
// top_k, group_offsets and group_classes (the experts' CSR groups, or None for one class per
// expert), steps, then the recombine tables (class group offsets, classes, log spread). steps: a
// list of (0, [E parameter dicts], has_bias, out_features) for a Linear or (1, callable, None,
// None) for a row-wise layer. It runs below autograd (the caller has grad mode off).
//
// Returns None, having done nothing, when z is not a Tensor[B, C] for x's B and that C: the caller
// checks it and explains. With routing False and the forward complete, out alone: wrapping seven
// more tensors for Python costs a one-sample call more than it uses. Otherwise (out, outputs,
// log_probs, counts, offsets, perm, sample_offsets, sample_rows), where out is None when the
// caller must finish: outputs None where a weight or bias is not a plain entry of its module's
// parameters (parametrized, pruned: the module computes it on access), or the specialists'
// outputs when they are not float32 [N, C] (binary experts, or an error to explain).
constexpr int kLinearStep = 0;
constexpr int kCallStep = 1;

struct Step {
  int kind;
  PyObject* target;  // borrowed: the list of parameter dicts, or the callable
  bool has_bias;
  int64_t out_features;
};

std::vector<Step> steps_arg(const char* fn, PyObject* obj) {
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) bad_argument(fn, "steps", "a list of step tuples", obj);
  std::vector<Step> steps;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) bad_argument(fn, "steps", "a list of 4-tuples", item);
    const int64_t kind = int_arg(fn, "a step's kind", PyTuple_GET_ITEM(item, 0));
    PyObject* target = PyTuple_GET_ITEM(item, 1);
    if (kind == kLinearStep) {
      if (!PyList_Check(target)) bad_argument(fn, "a Linear step's parameters", "a list of dicts", target);
      steps.push_back({kLinearStep, target, bool_arg(fn, "a Linear step's has_bias", PyTuple_GET_ITEM(item, 2)),
                       int_arg(fn, "a Linear step's out_features", PyTuple_GET_ITEM(item, 3))});
    } else if (kind == kCallStep) {
      if (!PyCallable_Check(target)) bad_argument(fn, "a call step's layer", "callable", target);
      steps.push_back({kCallStep, target, false, 0});
    } else {
      TORCH_CHECK_VALUE(false, fn, ": a step's kind must be 0 (Linear) or 1 (call), got ", kind);
    }
  }
  return steps;
}

// The tensor `name` of a module's parameter dict, or nothing when it is not there (a parametrized
// or pruned weight) or not a tensor. A dict subclass is read through its own __getitem__, as Python
// would.
std::optional<Tensor> parameter_entry(PyObject* dict, PyObject* name) {
  if (PyDict_CheckExact(dict)) {
    PyObject* value = PyDict_GetItemWithError(dict, name);  // borrowed
    if (value == nullptr && PyErr_Occurred()) throw python_error();
    if (value == nullptr || !THPVariable_Check(value)) return std::nullopt;
    return THPVariable_Unpack(value);
  }
  PyObject* value = PyObject_GetItem(dict, name);  // a new reference
  if (value == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_KeyError)) throw python_error();
    PyErr_Clear();
    return std::nullopt;
  }
  std::optional<Tensor> tensor;
  if (THPVariable_Check(value)) tensor = THPVariable_Unpack(value);
  Py_DECREF(value);
  return tensor;
}

PyObject* py_grouped_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "grouped_forward";
  check_count(fn, nargs, 12);
  static const auto linear = handle<Tensor(const Tensor&, at::TensorList, at::TensorList, const Tensor&, int64_t,
                                           const std::optional<Tensor>&)>("mnn_fast::segment_linear_experts");
  static PyObject* const weight_name = PyUnicode_InternFromString("weight");
  static PyObject* const bias_name = PyUnicode_InternFromString("bias");

  const ForwardArgs a = forward_args(fn, args);
  const Tensor& x = a.x;
  const int64_t C = a.C;
  const std::vector<Step> steps = steps_arg(fn, args[8]);
  const RecombineTables tables = recombine_tables(fn, args, 9);
  if (!THPVariable_Check(args[0])) Py_RETURN_NONE;
  const Tensor& z = THPVariable_Unpack(args[0]);
  if (z.dim() != 2 || x.dim() < 1 || z.size(0) != x.size(0) || z.size(1) != C) Py_RETURN_NONE;

  // The caller's region may be below autograd already; this call is one without it too.
  const at::AutoDispatchBelowAutograd below_autograd;
  const SwitchRouting routed = route_switch(z, a.threshold, a.top_k, a.expert_offsets, a.expert_classes);
  const Tensor& counts = routed.counts;
  const Tensor& offsets = routed.offsets;
  const Tensor& perm = routed.perm;
  const int64_t E = counts.numel();
  const int64_t* count = counts.data_ptr<int64_t>();  // route's own output: CPU, contiguous int64
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] > 0) active.push_back(e);
  }
  // Every Linear's tensors are read before any layer runs, so a fallback wastes no matmul.
  std::vector<std::vector<Tensor>> weights, biases;
  bool plain = true;
  for (const Step& step : steps) {
    if (step.kind != kLinearStep) continue;
    plain = PyList_GET_SIZE(step.target) == E;
    std::vector<Tensor>& w = weights.emplace_back();
    std::vector<Tensor>& b = biases.emplace_back();
    for (size_t j = 0; plain && j < active.size(); ++j) {
      PyObject* params = PyList_GET_ITEM(step.target, active[j]);
      std::optional<Tensor> weight = parameter_entry(params, weight_name);
      std::optional<Tensor> bias = step.has_bias ? parameter_entry(params, bias_name) : std::nullopt;
      plain = weight.has_value() && (bias.has_value() || !step.has_bias);
      if (plain) w.push_back(*std::move(weight));
      if (plain && bias.has_value()) b.push_back(*std::move(bias));
    }
    if (!plain) break;
  }
  std::optional<Tensor> outputs, out;
  if (plain) {
    Tensor h = x;
    std::optional<Tensor> rows = perm;  // the first Linear reads x's routed rows itself
    size_t layer = 0;
    for (const Step& step : steps) {
      if (step.kind == kLinearStep) {
        WithoutGil no_gil;
        h = linear.call(h, weights[layer], biases[layer], offsets, step.out_features, rows);
        rows = std::nullopt;
        ++layer;
        continue;
      }
      PyObject* arg = THPVariable_Wrap(h);
      if (arg == nullptr) throw python_error();
      PyObject* result = PyObject_CallOneArg(step.target, arg);
      Py_DECREF(arg);
      if (result == nullptr) throw python_error();
      if (!THPVariable_Check(result)) {
        const std::string got = Py_TYPE(result)->tp_name;
        Py_DECREF(result);
        throw torch::TypeError(std::string(fn) + ": a specialist layer must return a Tensor, got " + got);
      }
      h = THPVariable_Unpack(result);
      Py_DECREF(result);
    }
    outputs = h;
    if (h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(0) == perm.size(0) && h.size(1) == C) {
      out = recombine_routed(routed.log_probs, {h}, offsets, tables, routed.sample_offsets, routed.sample_rows);
    }
  }
  if (out.has_value() && !a.want_routing) return THPVariable_Wrap(*out);
  PyObject* held = outputs.has_value() ? THPVariable_Wrap(*outputs) : (Py_INCREF(Py_None), Py_None);
  if (held == nullptr) return nullptr;
  PyObject* result = forward_result(out, held, routed, a.want_routing);
  Py_DECREF(held);
  return result;
  END_HANDLE_TH_ERRORS
}

}  // namespace

namespace mnn_fast {
namespace serving {
PyObject* py_sequential_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs);  // sequential.cpp
}  // namespace serving
}  // namespace mnn_fast

using mnn_fast::serving::py_sequential_forward;

#define MNN_FAST_ENTRY(name, doc) \
  { "serve_" #name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_##name)), METH_FASTCALL, doc }

PyMethodDef kMnnFastServingMethods[] = {
    MNN_FAST_ENTRY(softmax_rows, "mnn_fast::softmax_rows(x), called unboxed"),
    MNN_FAST_ENTRY(group_scores, "mnn_fast::group_scores(probs, group_offsets, group_classes), called unboxed"),
    MNN_FAST_ENTRY(route, "mnn_fast::route(scores, threshold, top_k), called unboxed"),
    MNN_FAST_ENTRY(recombine, "mnn_fast::recombine(logp, logits, offsets, ...), called unboxed"),
    MNN_FAST_ENTRY(segment_linear, "mnn_fast::segment_linear(x, weight, bias, offsets, parallel_segments, perm), called unboxed"),
    MNN_FAST_ENTRY(segment_linear_experts,
                   "mnn_fast::segment_linear_experts(x, weights, biases, offsets, out_features, perm), called unboxed"),
    MNN_FAST_ENTRY(gather_split, "mnn_fast::gather_split(x, perm, offsets), called unboxed"),
    MNN_FAST_ENTRY(grouped_forward,
                   "A grouped Linear stack's forward after the switch: softmax_rows, route, its Linears, recombine"),
    MNN_FAST_ENTRY(sequential_forward,
                   "The sequential executor's forward after the switch: routing, gather_split, the experts, recombine"),
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__serving(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_serving", nullptr, -1, kMnnFastServingMethods};
  return PyModule_Create(&module_def);
}
