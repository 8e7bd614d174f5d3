// Which SIMD instruction set the CPU row kernels use, chosen once at run time, in one place.
// Every choice gives the same bits (per lane the operations of csrc/rowmath.h, in its order, no FMA),
// so the choice is about speed only; tests switch it to compare (set_isa).
#pragma once

#include <string>

namespace mnn_fast {
namespace cpu {

// sse2: the 16 lanes as four SSE2 registers, one row at a time (every x86-64 CPU). avx2: the same
// lanes as two AVX2 registers, and the tile kernels (tile_impl.h) eight rows at a time. avx512:
// the tile kernels sixteen rows at a time in AVX-512 registers, wide rows one at a time in them
// (rows.h's row-at-a-time passes stay AVX2).
enum class Isa : int { kSse2 = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kIsaCount = 3;

const char* isa_name(Isa isa);
// "" when this CPU (and build) can run `isa`, else why not, in one line.
std::string isa_unavailable(Isa isa);
// The ISA in use: the best this CPU can run, or what MNN_FAST_CPU_ISA names (when usable), or the last set_isa.
Isa isa();
// Makes `name` ("sse2", "avx2", "avx512", or "auto" = the best usable) the ISA in use; throws
// ValueError naming the name and the reason when it cannot run here. Returns the previous one's name.
std::string set_isa(const std::string& name);
// Why MNN_FAST_CPU_ISA was not followed ("" when unset or followed).
const std::string& isa_env_note();

}  // namespace cpu
}  // namespace mnn_fast
