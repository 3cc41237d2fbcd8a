// The Python module lwam._C. Importing it loads this shared library, whose static initialisers
// register the lwam::latent_downsample operators (TORCH_LIBRARY_* in latent_downsample.cpp and
// latent_downsample_cuda.cu) with the PyTorch dispatcher. The module itself only carries constants.
#include <Python.h>

static PyModuleDef lwam_C_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of lwam; importing registers torch.ops.lwam.latent_downsample(_backward).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&lwam_C_module);
  if (m == nullptr) return nullptr;
#ifdef LWAM_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
