// Registration hooks of the C++ components of megatron_jam._C.
#pragma once
#include <pybind11/pybind11.h>

namespace megatron_jam {
// Defined in registry.cpp; calls every component's register function.
void register_all(pybind11::module_& m);
// indexed_builder.cpp: megatron_jam._C.indexed (Megatron MMap dataset writer).
void register_indexed_builder(pybind11::module_& m);
}  // namespace megatron_jam
