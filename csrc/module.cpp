// The Python module pykernels._C. It exports nothing itself: importing it loads the library, whose static
// TORCH_LIBRARY registrations define the pykernels:: operators (no pybind11 needed).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
