// Run-time values turned into compile-time ones: a choice made once per tile (at run time) selects code compiled
// for that choice, with the branches it decides gone from the per-element loops. Used where an option tested per
// element, inlined over an unrolled tile, left the common path jumping around the others' code (the attention
// kernels' score modes, the linear cross-entropy epilogues).
#pragma once
#include <type_traits>

namespace pykernels {
namespace cuda {

// f(std::integral_constant<E, V>{}) for the V of Vs equal to v (the first; none when no V equals it): one copy of
// f's code per listed value.
template <typename E, E... Vs, typename F>
__device__ __forceinline__ void specialize(E v, F&& f) {
  (void)((v == Vs ? (f(std::integral_constant<E, Vs>{}), true) : false) || ...);
}

}  // namespace cuda
}  // namespace pykernels
