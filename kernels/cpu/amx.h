// AMX tiles shared by the CPU kernels (mixer_blocks.cpp: bf16; int8_blocks.cpp: int8): the tile
// configuration both use, the process's request for the tile state, and, for int8, the tile
// operations behind two interchangeable backends: AmxTiles (the instructions) and
// EmulatedTiles (the same operations in plain C++, checked against the configuration, so that
// the int8 AMX GEMM runs, and is tested, on CPUs without AMX).
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstring>

namespace mixrank_amx {

// Palette 1, all eight tiles 16 rows x 64 bytes: bf16 (mixer_blocks.cpp) uses tiles 0-3 as the
// 2x2 fp32 accumulators (16 x 16), 4-5 as the two 16-row A tiles (16 x 32 bf16), 6-7 as the two
// B tiles (16 K-pairs x 16 columns x 2); int8 (int8_blocks.cpp) the same with int32
// accumulators, 16 x 64 u8 A tiles and B tiles of 16 K-quads x 16 columns x 4 s8.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Linux hands out the AMX tile state only on request (once per process).
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

#ifdef __AMX_INT8__
// The AMX-INT8 instructions (needs amx_permitted() and a CPU with AMX-INT8). GCC's tile
// intrinsics paste the tile number into the instruction's text, so each takes a literal:
// the template arguments select one.
#define MIXRANK_TILE_CASES(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)
struct AmxTiles {
  static void config(const TileConfig& c) { _tile_loadconfig(&c); }
  static void release() { _tile_release(); }
  // GCC's tile load names only the address register, not the memory it reads: the barrier
  // keeps the stores that filled it (the quantized rows) before the load.
  template <int T>
  static void load(const void* p, int64_t stride) {
    asm volatile("" ::: "memory");
#define MIXRANK_LOAD(i) if constexpr (T == i) _tile_loadd(i, p, stride);
    MIXRANK_TILE_CASES(MIXRANK_LOAD)
#undef MIXRANK_LOAD
  }
  template <int T>
  static void store(void* p, int64_t stride) {
#define MIXRANK_STORE(i) if constexpr (T == i) _tile_stored(i, p, stride);
    MIXRANK_TILE_CASES(MIXRANK_STORE)
#undef MIXRANK_STORE
  }
  // C (int32) += A (u8) . B (s8), for the 2x2 blocking's four (C, A, B) triples
  template <int C, int A, int B>
  static void dpbusd() {
    if constexpr (C == 0 && A == 4 && B == 6) _tile_dpbusd(0, 4, 6);
    else if constexpr (C == 1 && A == 4 && B == 7) _tile_dpbusd(1, 4, 7);
    else if constexpr (C == 2 && A == 5 && B == 6) _tile_dpbusd(2, 5, 6);
    else if constexpr (C == 3 && A == 5 && B == 7) _tile_dpbusd(3, 5, 7);
    else static_assert(C < 0, "AmxTiles::dpbusd: add this (C, A, B) triple");
  }
};
#undef MIXRANK_TILE_CASES
#endif

// The same operations on eight thread-local 1 KB tiles: TILELOADD / TILESTORED copy `rows`
// rows of `colsb` bytes with the given stride; TDPBUSD adds to C[m][n] (int32) the products of
// A's row m (u8) with B's column n (s8, 4 consecutive K per 32-bit element, B's rows the K
// quads), with the shapes the instruction requires checked.
struct EmulatedTiles {
  // TDPBUSDs run so far, all threads (tests count them against the tiling's)
  static std::atomic<int64_t>& count() {
    static std::atomic<int64_t> n{0};
    return n;
  }
  struct Tile {
    alignas(64) uint8_t b[16][64];
    int rows, colsb;
  };
  static Tile* tiles() {
    static thread_local Tile t[8];
    return t;
  }
  static void config(const TileConfig& c) {
    TORCH_CHECK(c.palette == 1, "emulated AMX: palette ", int(c.palette));
    for (int i = 0; i < 8; ++i) {
      TORCH_CHECK(c.rows[i] <= 16 && c.colsb[i] <= 64 && c.colsb[i] % 4 == 0,
                  "emulated AMX: tile ", i, " configured ", int(c.rows[i]), " x ", c.colsb[i]);
      tiles()[i].rows = c.rows[i];
      tiles()[i].colsb = c.colsb[i];
      std::memset(tiles()[i].b, 0, sizeof(tiles()[i].b));
    }
  }
  static void release() {}
  template <int T>
  static void load(const void* p, int64_t stride) {
    Tile& t = tiles()[T];
    for (int r = 0; r < t.rows; ++r)
      std::memcpy(t.b[r], static_cast<const uint8_t*>(p) + r * stride, t.colsb);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    const Tile& t = tiles()[T];
    for (int r = 0; r < t.rows; ++r)
      std::memcpy(static_cast<uint8_t*>(p) + r * stride, t.b[r], t.colsb);
  }
  template <int C, int A, int B>
  static void dpbusd() {
    static_assert(C != A && C != B && A != B, "TDPBUSD: three distinct tiles");
    count().fetch_add(1, std::memory_order_relaxed);
    Tile &c = tiles()[C], &a = tiles()[A], &b = tiles()[B];
    TORCH_CHECK(c.rows == a.rows && c.colsb == b.colsb && a.colsb == 4 * b.rows,
                "emulated AMX: TDPBUSD shapes C ", c.rows, "x", c.colsb, ", A ", a.rows, "x",
                a.colsb, ", B ", b.rows, "x", b.colsb);
    for (int m = 0; m < c.rows; ++m)
      for (int n = 0; n < c.colsb / 4; ++n) {
        int32_t acc;
        std::memcpy(&acc, c.b[m] + 4 * n, 4);
        for (int k = 0; k < b.rows; ++k)
          for (int i = 0; i < 4; ++i)
            acc += int32_t(a.b[m][4 * k + i]) * int32_t(static_cast<int8_t>(b.b[k][4 * n + i]));
        std::memcpy(c.b[m] + 4 * n, &acc, 4);
      }
  }
};

}  // namespace mixrank_amx
