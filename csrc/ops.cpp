// Schemas of the mnn_fast custom ops. Semantics: docs/ops.md. Implementations register per
// backend in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in mnn_fast/ops.py.
// MNN_FAST_NO_PYTHON: the same ops as a plain shared library for C++ programs without libpython
// (examples/cpp builds it so); loading the library runs the registrations below either way.
#ifndef MNN_FAST_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#ifndef MNN_FAST_NO_PYTHON
// mnn_fast._C's own functions (the CPU ISA choice, csrc/cpu/isa.cpp).
extern PyMethodDef kMnnFastIsaMethods[];

extern "C" {
// Importing mnn_fast._C from Python loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMnnFastIsaMethods};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(mnn_fast, m) {
  m.def("group_scores(Tensor probs, Tensor group_offsets, Tensor group_classes) -> Tensor");
  m.def(
      "route(Tensor scores, float threshold, int top_k) -> "
      "(Tensor counts, Tensor offsets, Tensor perm, Tensor sample_offsets, Tensor sample_rows)");
  m.def("gather(Tensor x, Tensor perm) -> Tensor");
  m.def("gather_split(Tensor x, Tensor perm, Tensor offsets) -> Tensor[]");
  m.def("combine(Tensor logp, Tensor logv, Tensor perm, Tensor sample_offsets, Tensor sample_rows) -> Tensor");
  m.def(
      "recombine(Tensor logp, Tensor[] logits, Tensor offsets, Tensor group_offsets, Tensor group_classes, "
      "Tensor log_spread, Tensor sample_offsets, Tensor sample_rows) -> Tensor");
  m.def(
      "contributions(Tensor logits, Tensor offsets, Tensor group_offsets, Tensor group_classes, Tensor log_spread, "
      "int num_classes) -> Tensor");
  m.def("log_softmax_rows(Tensor x) -> Tensor");
  m.def("softmax_rows(Tensor x) -> (Tensor log_probs, Tensor probs)");
  m.def(
      "segment_linear(Tensor x, Tensor weight, Tensor? bias, Tensor offsets, bool parallel_segments=False, "
      "Tensor? perm=None) -> Tensor");
  m.def(
      "segment_linear_experts(Tensor x, Tensor[] weights, Tensor[] biases, Tensor offsets, int out_features, "
      "Tensor? perm=None) -> Tensor");
  m.def(
      "segment_stack(Tensor x, Tensor[] weights, Tensor?[] biases, str[] activations, float[] activation_args, "
      "Tensor offsets, Tensor? perm=None, int tile_rows=0) -> Tensor");
}
