// megatron_jam._C: the project's C++ extension (pybind11).
// Each component registers itself from its own translation unit through a
// `register_*` function declared in jam_cpp.h, so this file stays a table.
#include <pybind11/pybind11.h>

#include "jam_cpp.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "megatron-jam C++ extension";
  m.attr("__abi_version__") = 1;
  megatron_jam::register_all(m);
}
