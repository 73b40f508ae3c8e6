// CPU kernels of the locally connected 2-D FF layer (see local2d_cpu.h).
//
// Both kernels first repack x (B, D) into batch tiles of 16 images, so that an input entry of
// a tile is one contiguous 64-byte run. The forward, which walks the entries of a window for
// a few tiles, keeps each tile's entries together (tiles, D, kBatchTile): a window row is one
// stretch of adjacent runs. The update, which walks every tile for each window entry, keeps
// each entry's tiles together (D, tiles, kBatchTile): one entry over all images is one stretch. The inner loops work on whole vectors held in registers:
//   forward: per (two batch tiles, location), acc[o] += weight[l, o, entry] * xt[tile, entry]
//   update:  per (span of adjacent locations in one output row, C_out chunk),
//            acc[o][entry] += delta[o, tile] * xt[tile, entry] over all tiles, summed across the
//            vector, then applied to the weight entry (gradient accumulation or SGD). The
//            locations of a span walk each window row in turn: their windows overlap, so a row's
//            inputs are read from memory once per span and from cache by the other locations.
// Work items run in parallel with OpenMP. The item functions are compiled for each instruction
// set of local2d_cpu_vec.h with its native vector width and register tile. The tile and
// delta-row strides are padded by one 64-byte run so that the rows of a window do not all map
// to the same cache sets.
#include "local2d_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "local2d_cpu_rows.h"
#include "local2d_cpu_vec.h"

namespace ff_kernels {
namespace cpu {
namespace {

constexpr int kBatchTile = 16;    // images per tile: the layout unit of xt and delta
constexpr int kTilesPerItem = 2;  // batch tiles per forward work item
constexpr int kOutChunk = 32;     // output units per parallel work item of the update
constexpr int kUpdateSpan = 8;    // most adjacent locations per update work item

// Which runs of a BatchTiles are adjacent (see the top of this file).
enum class TileOrder { kTileMajor, kEntryMajor };

// x (B, D) repacked as tiles of kBatchTile images: entry d of image tile * kBatchTile + bb is at
// data[tile * tile_stride + d * entry_stride + bb]. Images past B are zero; the tile count is a
// multiple of kTilesPerItem. Strides are padded by one run so that runs a stride apart do not
// all map to the same cache sets.
struct BatchTiles {
  int tiles;
  int64_t tile_stride, entry_stride;  // kTileMajor: (D + 1) * kBatchTile and kBatchTile;
                                      // kEntryMajor: kBatchTile and (tiles + 1) * kBatchTile
  AlignedVector<float> data;

  BatchTiles(const float* x, int B, int D, TileOrder order, int num_threads)
      : tiles((B + kBatchTile * kTilesPerItem - 1) / (kBatchTile * kTilesPerItem) * kTilesPerItem),
        tile_stride(order == TileOrder::kTileMajor ? (static_cast<int64_t>(D) + 1) * kBatchTile : kBatchTile),
        entry_stride(order == TileOrder::kTileMajor ? kBatchTile : (static_cast<int64_t>(tiles) + 1) * kBatchTile),
        data(static_cast<size_t>(order == TileOrder::kTileMajor ? tiles : D + 1) *
                 (order == TileOrder::kTileMajor ? tile_stride : entry_stride),
             0.0f) {
    const int blocks = (D + kBatchTile - 1) / kBatchTile;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int tile = 0; tile < tiles; ++tile)
      for (int block = 0; block < blocks; ++block) {
        const int d0 = block * kBatchTile, d1 = std::min(D, d0 + kBatchTile);
        float* out = data.data() + tile * tile_stride;
        for (int bb = 0; bb < std::min(kBatchTile, B - tile * kBatchTile); ++bb) {  // none in padding tiles
          const float* row = x + static_cast<int64_t>(tile * kBatchTile + bb) * D;
          for (int d = d0; d < d1; ++d) out[d * entry_stride + bb] = row[d];
        }
      }
  }

  // Input entry `offset` (a Window::input_offset) of tile `tile`.
  const float* at(int tile, int offset) const {
    return data.data() + tile * tile_stride + offset * entry_stride;
  }
};

// The valid rows (c, di) of one window in block order: the input offset and block index of
// each row's first valid entry; every row has `cols` consecutive entries.
struct WindowRows {
  std::vector<int> input, block;
  int count = 0, cols = 0;

  explicit WindowRows(const Local2dShape& s) : input(s.in_channels * s.kernel), block(s.in_channels * s.kernel) {}

  void build(const Window& w) {
    count = 0;
    cols = w.cols();
    for (int c = 0; c < w.channels; ++c)
      for (int di = w.di_lo; di < w.di_hi; ++di, ++count) {
        input[count] = w.input_offset(c, di, w.dj_lo);
        block[count] = w.block_index(c, di, w.dj_lo);
      }
  }
};

// Per-thread scratch of the forward: the window rows and every unit's accumulators z
// (C_out, kTilesPerItem * kBatchTile) for the item's images.
struct ForwardScratch {
  static constexpr int kUnitStride = kTilesPerItem * kBatchTile;
  WindowRows rows;
  AlignedVector<float> z;

  explicit ForwardScratch(const Local2dShape& s) : rows(s), z(static_cast<size_t>(s.out_channels) * kUnitStride) {}
};

// Per-thread scratch of the update: the window rows of each location of a span and their delta
// rows. Row (jj, o) holds delta[:, o0 + o, l0 + jj] over all images, zero past B (the rows are
// zeroed once and only their first B entries are ever written).
struct UpdateScratch {
  std::vector<WindowRows> rows;  // one per location of the span
  int units;                     // delta rows per location
  int64_t delta_stride;          // (tiles + 1) * kBatchTile: one run of padding per row
  AlignedVector<float> delta;

  UpdateScratch(const Local2dShape& s, int tiles, int span, int units)
      : rows(span, WindowRows(s)),
        units(units),
        delta_stride((tiles + 1) * static_cast<int64_t>(kBatchTile)),
        delta(static_cast<size_t>(span) * units * delta_stride) {}
  float* delta_row(int jj, int o) { return delta.data() + (static_cast<int64_t>(jj) * units + o) * delta_stride; }
};

// Window entries per cache block: the forward walks a block of rows for every unit before
// moving on (kForwardBlock entries x kTilesPerItem tiles x 64 bytes = 16 KiB); the update
// walks a block of kUpdateBlockBytes of xt (all tiles) for every unit and location of a span.
// A span is as long as its delta rows fit kUpdateDeltaBytes (up to kUpdateSpan locations).
constexpr int kForwardBlock = 128;
constexpr int kUpdateBlockBytes = 16 * 1024;
constexpr int64_t kUpdateDeltaBytes = 256 * 1024;

// The kernels for vectors of Lanes floats. Register tiles: the forward keeps kForwardUnits x
// kTilesPerItem x kVecs accumulators, the update kUpdateUnits x kUpdateEntries x kVecs, sized
// to the instruction set's register file.
template <int Lanes>
struct Kernels {
  using Vec = typename VecOf<Lanes>::type;
  static constexpr int kVecs = kBatchTile / Lanes;  // vectors per batch tile
  static constexpr int kForwardUnits = Lanes == 4 ? 1 : 3;
  static constexpr int kUpdateUnits = Lanes == 16 ? 3 : Lanes == 8 ? 2 : 1;
  static constexpr int kUpdateEntries = Lanes == 16 ? 4 : Lanes == 8 ? 2 : 1;

  static FF_ALWAYS_INLINE Vec load(const float* p) { return load_vec<Lanes>(p); }

  // z[o] += sum over rows r0 .. r1 - 1 of the window of weight[l, o0 + o, entry] *
  // xt[tile, entry] for NO units (wl: unit o0's weight block, z: unit o0's accumulators) and
  // the batch tiles tile0 .. tile0 + kTilesPerItem - 1.
  template <int NO>
  static FF_ALWAYS_INLINE void forward_units(const WindowRows& rows, int r0, int r1, const float* wl, int K,
                                             int tile0, const BatchTiles& xt, float* z) {
    constexpr int kAcc = kTilesPerItem * kVecs;  // vectors per unit: tile k, vector v at k * kVecs + v
    Vec acc[NO][kAcc];
    for (int o = 0; o < NO; ++o)
      for (int a = 0; a < kAcc; ++a) acc[o][a] = load(z + o * ForwardScratch::kUnitStride + a * Lanes);
    for (int r = r0; r < r1; ++r) {
      const float* xrow = xt.at(tile0, rows.input[r]);
      const float* wrow = wl + rows.block[r];
      for (int dj = 0; dj < rows.cols; ++dj) {
        Vec p[kAcc];
        for (int k = 0; k < kTilesPerItem; ++k)
          for (int v = 0; v < kVecs; ++v)
            p[k * kVecs + v] = load(xrow + k * xt.tile_stride + dj * xt.entry_stride + v * Lanes);
        for (int o = 0; o < NO; ++o) {
          const float wv = wrow[o * K + dj];
          for (int a = 0; a < kAcc; ++a) acc[o][a] += wv * p[a];
        }
      }
    }
    for (int o = 0; o < NO; ++o)
      for (int a = 0; a < kAcc; ++a)
        std::memcpy(z + o * ForwardScratch::kUnitStride + a * Lanes, &acc[o][a], sizeof(Vec));
  }

  // h[images, :, l] = epilogue(bias[l, :] + the window's weighted sum) for the batch tiles
  // tile0 .. tile0 + kTilesPerItem - 1, one cache block of window rows at a time.
  static FF_ALWAYS_INLINE void forward_item(const Local2dShape& s, int l, int tile0, const BatchTiles& xt,
                                            const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                                            float* h, ForwardScratch& scratch) {
    constexpr int kStride = ForwardScratch::kUnitStride;
    WindowRows& rows = scratch.rows;
    rows.build(window_of(s, l));
    const int K = s.block_size(), units = s.out_channels;
    const int64_t unit0 = static_cast<int64_t>(l) * units;
    float* z = scratch.z.data();
    for (int o = 0; o < units; ++o)
      std::fill(z + o * kStride, z + (o + 1) * kStride, bias != nullptr ? bias[unit0 + o] : 0.0f);
    const int block_rows = std::max(1, kForwardBlock / rows.cols);
    for (int r0 = 0; r0 < rows.count; r0 += block_rows) {
      const int r1 = std::min(rows.count, r0 + block_rows);
      int o = 0;
      for (; o + kForwardUnits <= units; o += kForwardUnits)
        forward_units<kForwardUnits>(rows, r0, r1, weight + (unit0 + o) * K, K, tile0, xt, z + o * kStride);
      for (; o < units; ++o) forward_units<1>(rows, r0, r1, weight + (unit0 + o) * K, K, tile0, xt, z + o * kStride);
    }
    const int64_t L = s.locations(), out_image = s.out_image_size();
    for (int k = 0; k < kTilesPerItem; ++k) {
      const int b0 = (tile0 + k) * kBatchTile, nb = std::min(kBatchTile, s.batch - b0);
      for (int bb = 0; bb < nb; ++bb)
        for (int o = 0; o < units; ++o) {
          const int64_t i = (b0 + bb) * out_image + o * L + l;
          h[i] = epilogue(z[o * kStride + k * kBatchTile + bb], i);
        }
    }
  }

  // g[o][t] = sum over all images of delta[o] * xt[entry offset + t] for NO delta rows (stride
  // ds) and NT consecutive window entries.
  template <int NO, int NT>
  static FF_ALWAYS_INLINE void grad_units(const float* delta, int64_t ds, const BatchTiles& xt, int offset,
                                          float (&g)[NO][NT]) {
    Vec acc[NO][NT][kVecs] = {};
    for (int tile = 0; tile < xt.tiles; ++tile) {
      const float* p = xt.at(tile, offset);
      Vec x[NT][kVecs];
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < kVecs; ++v) x[t][v] = load(p + t * xt.entry_stride + v * Lanes);
      for (int o = 0; o < NO; ++o)
        for (int v = 0; v < kVecs; ++v) {
          const Vec d = load(delta + o * ds + tile * kBatchTile + v * Lanes);
          for (int t = 0; t < NT; ++t) acc[o][t][v] += d * x[t][v];
        }
    }
    for (int o = 0; o < NO; ++o)
      for (int t = 0; t < NT; ++t) {
        Vec sum = acc[o][t][0];
        for (int v = 1; v < kVecs; ++v) sum += acc[o][t][v];
        g[o][t] = sum_lanes<Lanes>(sum);
      }
  }

  // Apply g to weight entries index + o * K + t.
  template <int NO, int NT>
  static FF_ALWAYS_INLINE void apply(const UpdateTarget& u, int64_t index, int K, const float (&g)[NO][NT]) {
    for (int o = 0; o < NO; ++o)
      for (int t = 0; t < NT; ++t) {
        const int64_t i = index + static_cast<int64_t>(o) * K + t;
        update_entry(u, u.weight + i, u.weight_buf != nullptr ? u.weight_buf + i : nullptr, g[o][t]);
      }
  }

  // Gradient of units o0 .. o0 + NO - 1 for NT consecutive window entries (input offset
  // `offset`, weight index `index` of unit o0), applied to the target.
  template <int NO, int NT>
  static FF_ALWAYS_INLINE void update_entries(const float* delta, int64_t ds, const BatchTiles& xt, int offset,
                                              int64_t index, int K, const UpdateTarget& u) {
    float g[NO][NT];
    grad_units<NO, NT>(delta, ds, xt, offset, g);
    apply<NO, NT>(u, index, K, g);
  }

  // Weight update of units o0 .. o0 + NO - 1 at location l over window rows r0 .. r1 - 1;
  // delta holds their NO rows (stride ds), unit0 is the index of unit o0's weight block.
  template <int NO>
  static FF_ALWAYS_INLINE void update_units(const WindowRows& rows, int r0, int r1, int64_t unit0, int K,
                                            const float* delta, int64_t ds, const BatchTiles& xt,
                                            const UpdateTarget& u) {
    for (int r = r0; r < r1; ++r) {
      const int offset = rows.input[r];
      const int64_t index = unit0 + rows.block[r];
      int dj = 0;
      for (; dj + kUpdateEntries <= rows.cols; dj += kUpdateEntries)
        update_entries<NO, kUpdateEntries>(delta, ds, xt, offset + dj, index + dj, K, u);
      for (; dj < rows.cols; ++dj) update_entries<NO, 1>(delta, ds, xt, offset + dj, index + dj, K, u);
    }
  }

  // Units o_begin .. o_end - 1 of the adjacent locations l_begin .. l_end - 1 of one output
  // row: form delta (fused ReLU mask and goodness derivative) into the scratch rows, update
  // the biases, then the weight blocks, one cache block of window rows at a time for every
  // location of the span.
  static FF_ALWAYS_INLINE void update_item(const Local2dShape& s, int l_begin, int l_end, int o_begin, int o_end,
                                           const BatchTiles& xt, const float* h, const float* coef, Goodness kind,
                                           const UpdateTarget& u, UpdateScratch& scratch) {
    const int64_t L = s.locations(), out_image = s.out_image_size();
    for (int l = l_begin; l < l_end; ++l) {
      for (int o = o_begin; o < o_end; ++o) {
        float* row = scratch.delta_row(l - l_begin, o - o_begin);
        float sum = 0.0f;
        for (int b = 0; b < s.batch; ++b) {
          row[b] = goodness_delta(kind, coef[b], h[b * out_image + o * L + l]);
          sum += row[b];
        }
        if (u.bias != nullptr) {
          const int64_t i = static_cast<int64_t>(l) * s.out_channels + o;
          update_entry(u, u.bias + i, u.bias_buf != nullptr ? u.bias_buf + i : nullptr, sum);
        }
      }
      scratch.rows[l - l_begin].build(window_of(s, l));
    }
    // The locations of one output row have the same window rows (c, di); only the columns differ.
    const int count = scratch.rows[0].count;
    const int K = s.block_size();
    const int64_t entry_bytes = static_cast<int64_t>(xt.tiles) * kBatchTile * sizeof(float);
    const int block_rows = static_cast<int>(std::max<int64_t>(1, kUpdateBlockBytes / entry_bytes / s.kernel));
    for (int r0 = 0; r0 < count; r0 += block_rows) {
      const int r1 = std::min(count, r0 + block_rows);
      for (int l = l_begin; l < l_end; ++l) {
        const WindowRows& rows = scratch.rows[l - l_begin];
        int o = o_begin;
        for (; o + kUpdateUnits <= o_end; o += kUpdateUnits)
          update_units<kUpdateUnits>(rows, r0, r1, (l * s.out_channels + o) * static_cast<int64_t>(K), K,
                                     scratch.delta_row(l - l_begin, o - o_begin), scratch.delta_stride, xt, u);
        for (; o < o_end; ++o)
          update_units<1>(rows, r0, r1, (l * s.out_channels + o) * static_cast<int64_t>(K), K,
                          scratch.delta_row(l - l_begin, o - o_begin), scratch.delta_stride, xt, u);
      }
    }
  }
};

// One forward / update work item, compiled for one instruction set.
using ForwardItem = void (*)(const Local2dShape&, int, int, const BatchTiles&, const float*, const float*,
                             const ForwardEpilogue&, float*, ForwardScratch&);
using UpdateItem = void (*)(const Local2dShape&, int, int, int, int, const BatchTiles&, const float*, const float*,
                            Goodness, const UpdateTarget&, UpdateScratch&);

#define FF_DEFINE_ITEMS(suffix, target_attr, lanes)                                                              \
  target_attr void forward_item_##suffix(const Local2dShape& s, int l, int tile0, const BatchTiles& xt,         \
                                         const float* weight, const float* bias,                                \
                                         const ForwardEpilogue& epilogue, float* h, ForwardScratch& scratch) {  \
    Kernels<lanes>::forward_item(s, l, tile0, xt, weight, bias, epilogue, h, scratch);                           \
  }                                                                                                              \
  target_attr void update_item_##suffix(const Local2dShape& s, int l_begin, int l_end, int o_begin, int o_end,  \
                                        const BatchTiles& xt, const float* h, const float* coef, Goodness kind, \
                                        const UpdateTarget& u, UpdateScratch& scratch) {                         \
    Kernels<lanes>::update_item(s, l_begin, l_end, o_begin, o_end, xt, h, coef, kind, u, scratch);               \
  }

FF_DEFINE_ITEMS(base, , 4)
#ifdef FF_X86_DISPATCH
FF_DEFINE_ITEMS(avx2, FF_TARGET_AVX2, 8)
FF_DEFINE_ITEMS(avx512, FF_TARGET_AVX512, 16)
#endif


}  // namespace

void local2d_forward(const float* x, const float* weight, const float* bias, const ForwardEpilogue& epilogue,
                     float* h, const Local2dShape& s, int num_threads) {
  if (use_row_kernels(s)) return rows_forward(x, weight, bias, epilogue, h, s, num_threads);
  const ForwardItem item = FF_PICK_BUILD(forward_item);
  const BatchTiles xt(x, s.batch, s.image_size(), TileOrder::kTileMajor, num_threads);
  const int L = s.locations();
#pragma omp parallel num_threads(num_threads)
  {
    ForwardScratch scratch(s);
#pragma omp for collapse(2) schedule(dynamic, 16)
    for (int tile0 = 0; tile0 < xt.tiles; tile0 += kTilesPerItem)
      for (int l = 0; l < L; ++l) item(s, l, tile0, xt, weight, bias, epilogue, h, scratch);
  }
}

void local2d_update(const float* x, const float* h, const float* coef, Goodness kind, const UpdateTarget& target,
                    const Local2dShape& s, int num_threads) {
  if (use_row_kernels(s)) return rows_update(x, h, coef, kind, target, s, num_threads);
  const UpdateItem item = FF_PICK_BUILD(update_item);
  const BatchTiles xt(x, s.batch, s.image_size(), TileOrder::kEntryMajor, num_threads);
  if (s.out_channels == 0 || s.locations() == 0) return;
  const int units = std::min(s.out_channels, kOutChunk), chunks = (s.out_channels + kOutChunk - 1) / kOutChunk;
  const int64_t delta_bytes = (xt.tiles + 1) * static_cast<int64_t>(kBatchTile) * sizeof(float) * units;
  const int span = static_cast<int>(std::clamp<int64_t>(kUpdateDeltaBytes / delta_bytes, 1, kUpdateSpan));
  const int spans = (s.out_width + span - 1) / span;  // per output row
  const int count = s.out_height * spans * chunks;
#pragma omp parallel num_threads(num_threads)
  {
    UpdateScratch scratch(s, xt.tiles, span, units);
#pragma omp for schedule(dynamic)
    for (int i = 0; i < count; ++i) {
      const int chunk = i % chunks, row = i / chunks / spans, j0 = (i / chunks % spans) * span;
      const int l_begin = row * s.out_width + j0, l_end = row * s.out_width + std::min(s.out_width, j0 + span);
      const int o_begin = chunk * kOutChunk;
      item(s, l_begin, l_end, o_begin, std::min(s.out_channels, o_begin + kOutChunk), xt, h, coef, kind, target,
           scratch);
    }
  }
}

}  // namespace cpu
}  // namespace ff_kernels
