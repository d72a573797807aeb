// Makes the shared library importable as `sdca._C`; importing it runs the static operator registrations.
#include <Python.h>

static struct PyModuleDef sdca_module = {PyModuleDef_HEAD_INIT, "_C", "SDCA kernels (registered as torch.ops.sdca)", -1,
                                         nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&sdca_module);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
