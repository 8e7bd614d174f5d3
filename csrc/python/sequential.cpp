// The sequential executor's whole forward after the switch, in one call (mnn_fast._serving): the
// switch's routing (softmax_rows, group_scores, route), gather_split (each expert's rows as a fresh
// tensor, as the naive loop's x[idx]), each active specialist called through Python on its rows, in
// increasing expert order, then recombine on their outputs. The same op calls in the same order as
// the module's step-by-step path, so the same bits; what goes is the Python between them (~1 us per
// expert and ~20 us a call: a fifth of an E = 100 forward of identity specialists on two threads).
#include <Python.h>

#include <ATen/core/LegacyTypeDispatch.h>

#include "entry.h"

namespace mnn_fast {
namespace serving {
namespace {

// With a ValueError set by specialist `expert` on `rows`: explain(expert, rows, error) either raises
// the explained error (chained from it), which replaces it, or returns, and the error stands.
void explain_failure(PyObject* explain, PyObject* expert, PyObject* rows) {
  if (!PyErr_ExceptionMatches(PyExc_ValueError)) return;
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  if (traceback != nullptr) PyException_SetTraceback(value, traceback);
  PyObject* returned = PyObject_CallFunctionObjArgs(explain, expert, rows, value, nullptr);
  if (returned == nullptr) {  // the explained error is set now
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return;
  }
  Py_DECREF(returned);
  PyErr_Restore(type, value, traceback);
}

// A new reference to a list of `n` Nones.
PyObject* list_of_none(Py_ssize_t n) {
  PyObject* list = PyList_New(n);
  if (list == nullptr) throw python_error();
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_INCREF(Py_None);
    PyList_SET_ITEM(list, i, Py_None);
  }
  return list;
}

// Owns one reference.
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* obj) : p(obj) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
};

}  // namespace

// Arguments: z (the switch's output), x, routing (whether the caller wants the routing back), C
// (the logits width the caller checked), threshold, top_k, group_offsets and group_classes (the
// experts' CSR groups, or None for one class per expert), D (x's row width the caller checked),
// experts (the specialists' ModuleList's module dict, read now, so a replaced specialist is the one
// called), explain (stages.explain_expert_error), then the recombine tables (class group offsets,
// classes, log spread). It runs below autograd (the caller has grad mode off).
//
// Returns None, having done nothing, when z is not a Tensor[B, C] for x's B and that C, or x not a
// Tensor[B, D]: the caller checks them and explains. Otherwise what grouped_forward returns, with
// outputs the list of the specialists' outputs (None for an expert without rows): out is None when
// the caller must finish, because an output is not a float32 [n_e, C] tensor (binary experts, other
// dtypes, or an error the caller's checks name), or, with outputs None, because the module dict
// does not hold one specialist per expert.
PyObject* py_sequential_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* fn = "sequential_forward";
  check_count(fn, nargs, 14);
  static const auto gather_split =
      handle<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&)>("mnn_fast::gather_split");

  const ForwardArgs a = forward_args(fn, args);
  const Tensor& x = a.x;
  const int64_t C = a.C;
  const int64_t D = int_arg(fn, "D", args[8]);
  PyObject* experts = args[9];
  if (!PyDict_Check(experts)) bad_argument(fn, "experts", "a dict of modules", experts);
  PyObject* explain = args[10];
  if (!PyCallable_Check(explain)) bad_argument(fn, "explain", "callable", explain);
  const RecombineTables tables = recombine_tables(fn, args, 11);
  if (!THPVariable_Check(args[0])) Py_RETURN_NONE;
  const Tensor& z = THPVariable_Unpack(args[0]);
  if (z.dim() != 2 || x.dim() != 2 || z.size(0) != x.size(0) || z.size(1) != C || x.size(1) != D) Py_RETURN_NONE;

  // The caller's region may be below autograd already; this call is one without it too.
  const at::AutoDispatchBelowAutograd below_autograd;
  const SwitchRouting routed = route_switch(z, a.threshold, a.top_k, a.expert_offsets, a.expert_classes);
  const int64_t E = routed.counts.numel();
  // The specialists as they are now (a copy: a specialist's forward could change the dict).
  const Ref specialists(PyDict_Values(experts));
  if (specialists.p == nullptr) throw python_error();
  if (PyList_GET_SIZE(specialists.p) != E) return forward_result(std::nullopt, Py_None, routed, true);
  std::vector<Tensor> parts;
  {
    WithoutGil no_gil;
    parts = gather_split.call(x, routed.perm, routed.offsets);
  }
  const int64_t* count = routed.counts.data_ptr<int64_t>();  // route's own output: CPU, contiguous int64
  const Ref outputs(list_of_none(E));
  std::vector<Tensor> logits(E);
  const Tensor no_rows = at::empty({0, C}, z.options().dtype(at::kFloat));
  bool plain = true;  // every output a float32 [n_e, C] tensor: recombine reads them as they are
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] == 0) {
      logits[e] = no_rows;
      continue;
    }
    PyObject* expert = PyList_GET_ITEM(specialists.p, e);
    const Ref rows(THPVariable_Wrap(parts[e]));
    if (rows.p == nullptr) throw python_error();
    PyObject* y = PyObject_CallOneArg(expert, rows.p);
    if (y == nullptr) {
      explain_failure(explain, expert, rows.p);
      throw python_error();
    }
    PyList_SetItem(outputs.p, e, y);  // steals y, drops the None
    if (!plain) continue;
    if (THPVariable_Check(y)) {
      const Tensor& t = THPVariable_Unpack(y);
      plain = t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == count[e] && t.size(1) == C;
      logits[e] = t;
    } else {
      plain = false;
    }
  }
  std::optional<Tensor> out;
  if (plain) {
    out = recombine_routed(routed.log_probs, logits, routed.offsets, tables, routed.sample_offsets,
                           routed.sample_rows);
  }
  return forward_result(out, outputs.p, routed, a.want_routing);
  END_HANDLE_TH_ERRORS
}

}  // namespace serving
}  // namespace mnn_fast
