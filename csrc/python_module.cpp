// The importable `maskrcnn_ops._C` module. Loading it runs the static
// TORCH_LIBRARY registrations; its attributes let maskrcnn_ops/__init__.py
// check that the binary matches the torch it is loaded into, and carry the
// constants the Python side shares with the kernels.
#include <Python.h>
#include <torch/version.h>

#include "common/nms_limits.h"
#include "cpu/isa.h"

namespace {

// The instruction set of the CPU kernel copies that run (csrc/cpu/isa.h).
PyObject* cpu_kernel_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(maskrcnn_ops::isa_name(maskrcnn_ops::active_isa()));
}

// Whether bfloat16 kernels use the AVX-512 BF16 instructions (csrc/cpu/isa.h).
PyObject* cpu_bf16_instructions(PyObject*, PyObject*) {
  return PyBool_FromLong(maskrcnn_ops::use_avx512_bf16());
}

PyMethodDef methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The instruction set of the CPU kernels that run: baseline, avx2 or avx512 "
     "(ATen's CPU capability, which ATEN_CPU_CAPABILITY can lower)."},
    {"cpu_bf16_instructions", cpu_bf16_instructions, METH_NOARGS,
     "Whether the bfloat16 RoIAlign forward uses the AVX-512 BF16 instructions (the CPU has them "
     "and the kernels run their AVX-512 copy)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of maskrcnn_ops; the operators live in torch.ops.maskrcnn_ops.",
    -1,
    methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef MASKRCNN_OPS_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddStringConstant(module, "built_with_torch", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(module, "nms_boxes_per_call", maskrcnn_ops::kNmsBoxesPerCall) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
