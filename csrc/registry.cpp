// Calls each component's registration function. Add a line per component.
#include "jam_cpp.h"

namespace megatron_jam {
void register_all(pybind11::module_& m) {
  register_indexed_builder(m);
}
}  // namespace megatron_jam
