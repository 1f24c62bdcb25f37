// The compiled extension mtlfast._C: a Python module that carries no Python functions of its
// own. Importing it runs the static registrations below and in csrc/cpu, csrc/cuda.
//
// The public ops (mtlfast::attention_distill, ...) are declared once, in Python
// (mtlfast/ops/<op>.py). The extension registers its raw kernels under the private namespace
// mtlfast_C; the Python backends "cpu" and "cuda" call them. Kernel entry points take
// preallocated outputs and a canonical layout (see mtlfast/ops/_layout.py): the trailing
// (C, H, W) block of every tensor is dense with identical strides, outer strides are free.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mtlfast compiled kernels (registered as torch.ops.mtlfast_C)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mtlfast_C, m) {
  // Name of the instruction set the CPU kernels dispatch to on this machine ("avx512", ...).
  m.def("cpu_isa() -> str");
  m.def("attention_distill_fwd(Tensor feats, Tensor mask_logits, Tensor messages, Tensor(a!) out) -> ()");
  m.def(
      "attention_distill_bwd(Tensor grad_out, Tensor mask_logits, Tensor messages, "
      "Tensor(a!) grad_mask_logits, Tensor(b!) grad_messages) -> ()");
}
