// Fixed-order causal attention for CPUs: a query row's bits depend on its own
// position and keys only, never on how many rows share the call.
//
// Why: the engine's batch invariance (a sequence scores the same bits alone, in
// a padded batch, packed, or as a GRPO completion over its prompt's KV cache)
// needs attention whose per-row reduction order is fixed. sdpa and MKL's bmm
// block by the row count, so service/engine/invariant_attention.py pads every
// call to a grid of 64-row query blocks; a GRPO completion that starts mid-block
// then pays for up to 63 padding rows. Here every row runs the same arithmetic
// in the same order whatever the call's shape:
//
//   scores   s_j = scale * sum_k q_k * K_jk   k = 0..D-1 in order (one FMA each),
//            keys in blocks of KB at offsets fixed relative to the sequence start;
//   softmax  m = max_j s_j (exact in any order), e_j = exp(s_j - m) with the one
//            polynomial below, l = sum of e_j in L lanes over the key blocks in
//            order, then the lanes 0..L-1 in order;
//   output   o = (sum over key blocks in order of (sum_j e_j * V_j, j ascending in the
//            block)) / l.
//
// A tile of R rows shares the loads of K and V; a key a row cannot see gets
// score -inf and weight exactly 0, so a key block or a V row that only the
// tile's other rows need adds exact zeros and changes no bit. Rows past the end
// of a sequence are computed from a clamped row and never written.
//
// Layout: q [B, Hq, Tq, D] and out (any strides, D contiguous), kt = K transposed
// [B, Hkv, D, Tkp] contiguous with Tkp >= every key block's end (the launcher pads),
// v [B, Hkv, Tk, D] (D contiguous). D is a multiple of 16 (the launcher pads).
// seqs [S, 6] int64 rows (b, q_tok0, q_count, pos0, k_tok0, k_count): query i of
// sequence s is token q_tok0 + i of batch row b at absolute position pos0 + i; its
// keys are tokens k_tok0 + j, j < k_count, visible when j <= pos0 + i (and
// j > pos0 + i - window when window > 0).
//
// Built by kernels/cpu_attention.py with -O3 -march=native: GCC's vector
// extensions become AVX-512, AVX2 or SSE/NEON code for the CPU at hand, with the
// lane count L, key block KB and tile sizes chosen for that target below. A row's
// bits are fixed within one build; builds for different targets differ.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Vector width and tile sizes follow the build target, so the accumulators fit its registers
// (32 on AVX-512, 16 on AVX2/SSE). They are constants of a build: every row of every call uses
// the same ones.
#if defined(__AVX512F__)
constexpr int VBYTES = 64, R = 8, PV_ROWS = 4;
#elif defined(__AVX__)
constexpr int VBYTES = 32, R = 6, PV_ROWS = 3;
#else
constexpr int VBYTES = 16, R = 4, PV_ROWS = 2;
#endif
constexpr int L = VBYTES / 4;  // lanes
constexpr int KB = 2 * L;      // keys per score block: two vectors
constexpr int PVC = 4;         // vectors of the head dim per weighted-value pass
static_assert(R % PV_ROWS == 0, "PV_ROWS must divide R");

typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
// for loads and stores at any float's address (memcpy here made GCC stage vectors through the
// stack on AVX2, 13x slower)
typedef float vf_u __attribute__((vector_size(VBYTES), aligned(4), may_alias));

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (scores minus their max); exactly 0 below -87, where the
// result would be subnormal. Cephes' expf polynomial: ~1 ulp on [-87, 0].
inline vf exp_nonpos(vf x) {
  const vf lo = splat(-87.0f);
  vf xc = x < lo ? lo : x;
  vf fx = xc * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);
  vf nf = __builtin_convertvector(n, vf);
  nf = nf > fx ? nf - 1.0f : nf;  // floor: the conversion truncates toward 0
  n = __builtin_convertvector(nf, vi);
  vf r = xc - nf * 0.693359375f - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf y = p * scale;
  return x < lo ? vf{} : y;
}

struct Seq { int64_t b, q0, nq, pos0, k0, nk; };
struct Item { int32_t seq, head, row0; int64_t keys; };

struct Args {
  const float* q; const float* kt; const float* v; float* out;
  int64_t qs[3], ks[2], vs[3], os[3];  // strides: q/out (b, h, t); kt (b, h); v (b, h, t)
  int64_t hq, hkv, tkp;
  float scale; int64_t window;
};

// One tile: R query rows of one sequence and head. NV = head dim / L vectors.
template <int NV>
void tile(const Args& a, const Seq& s, int head, int64_t row0, std::vector<float>& scratch) {
  constexpr int D = NV * L;
  const int64_t kvh = head / (a.hq / a.hkv);
  const float* qrow[R];
  int64_t pos[R];
  for (int r = 0; r < R; ++r) {
    int64_t i = std::min<int64_t>(row0 + r, s.nq - 1);
    qrow[r] = a.q + s.b * a.qs[0] + head * a.qs[1] + (s.q0 + i) * a.qs[2];
    pos[r] = s.pos0 + i;
  }
  const int64_t hi = std::min<int64_t>(pos[R - 1] + 1, s.nk);  // keys the tile's last row may see
  int64_t lo = a.window > 0 ? std::max<int64_t>(0, pos[0] - a.window + 1) : 0;
  lo = std::min<int64_t>(lo / KB * KB, std::max<int64_t>(hi, 0));
  const int64_t nkeys = hi - lo;
  const int64_t nblk = (nkeys + KB - 1) / KB;
  const int64_t ld = nblk * KB;
  scratch.resize(R * std::max<int64_t>(ld, 1));
  float* S = scratch.data();
  const float* kt = a.kt + s.b * a.ks[0] + kvh * a.ks[1] + s.k0;
  const float* vb = a.v + s.b * a.vs[0] + kvh * a.vs[1] + s.k0 * a.vs[2];

  // scores, masked to -inf
  const int64_t first_max = a.window > 0 ? pos[R - 1] - a.window + 1 : 0;
  const int64_t last_min = std::min<int64_t>(pos[0], s.nk - 1);
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t j0 = lo + blk * KB;
    vf acc[R][2] = {};
    const float* kp = kt + j0;
    for (int k = 0; k < D; ++k) {
      vf k0 = load(kp + k * a.tkp), k1 = load(kp + k * a.tkp + L);
      for (int r = 0; r < R; ++r) {
        float qk = qrow[r][k];
        acc[r][0] += qk * k0;
        acc[r][1] += qk * k1;
      }
    }
    const bool whole = j0 >= first_max && j0 + KB - 1 <= last_min;  // every row sees every key of the block
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < 2; ++c) store(S + r * ld + blk * KB + c * L, acc[r][c] * a.scale);
      if (whole) continue;
      int64_t first = a.window > 0 ? pos[r] - a.window + 1 : 0;
      int64_t last = std::min<int64_t>(pos[r], s.nk - 1);
      float* dst = S + r * ld + blk * KB;
      for (int l = 0; l < KB; ++l) {
        int64_t j = j0 + l;
        if (j < first || j > last) dst[l] = NEG_INF;
      }
    }
  }

  // softmax numerators in place; denominators per row (0: the row sees no key)
  float den[R];
  for (int r = 0; r < R; ++r) {
    float* row = S + r * ld;
    vf mv = splat(NEG_INF);
    for (int64_t j = 0; j < ld; j += L) {
      vf x = load(row + j);
      mv = x > mv ? x : mv;
    }
    float m = NEG_INF;
    for (int i = 0; i < L; ++i) m = std::max(m, mv[i]);
    if (m == NEG_INF) {  // no visible key (only past a sliding window): output 0, as sdpa gives
      std::fill(row, row + ld, 0.0f);
      den[r] = 0.0f;
      continue;
    }
    vf lanes = {};
    for (int64_t j = 0; j < ld; j += L) {
      vf e = exp_nonpos(load(row + j) - m);
      store(row + j, e);
      lanes += e;
    }
    float l = 0.0f;
    for (int i = 0; i < L; ++i) l += lanes[i];
    den[r] = l;
  }

  // weighted values, PV_ROWS rows x PVC vectors of the head dim at a time (what fits the
  // registers); each key block's sum is formed apart and then added to the row's total
  // (two levels: the rounding error grows with the block count, not the key count)
  for (int r0 = 0; r0 < R; r0 += PV_ROWS) {
    for (int c0 = 0; c0 < NV; c0 += PVC) {
      constexpr int W = NV < PVC ? NV : PVC;
      const int w = std::min(W, NV - c0);
      vf total[PV_ROWS][W] = {};
      for (int64_t b0 = 0; b0 < nkeys; b0 += KB) {
        vf acc[PV_ROWS][W] = {};
        const int64_t b1 = std::min<int64_t>(b0 + KB, nkeys);
        for (int64_t j = b0; j < b1; ++j) {
          const float* vr = vb + (lo + j) * a.vs[2] + c0 * L;
          vf vv[W];
          for (int c = 0; c < W; ++c) vv[c] = c < w ? load(vr + L * c) : vf{};
          for (int r = 0; r < PV_ROWS; ++r) {
            float p = S[(r0 + r) * ld + j];
            for (int c = 0; c < W; ++c) acc[r][c] += p * vv[c];
          }
        }
        for (int r = 0; r < PV_ROWS; ++r)
          for (int c = 0; c < W; ++c) total[r][c] += acc[r][c];
      }
      for (int r = 0; r < PV_ROWS; ++r) {
        int64_t i = row0 + r0 + r;
        if (i >= s.nq) break;
        float* o = a.out + s.b * a.os[0] + head * a.os[1] + (s.q0 + i) * a.os[2] + c0 * L;
        const float l = den[r0 + r];
        for (int c = 0; c < w; ++c) store(o + L * c, l > 0.0f ? total[r][c] / l : vf{});
      }
    }
  }
}

template <int NV>
void run(const Args& a, const std::vector<Seq>& seqs) {
  std::vector<Item> items;
  for (size_t si = 0; si < seqs.size(); ++si) {
    const Seq& s = seqs[si];
    for (int64_t row0 = 0; row0 < s.nq; row0 += R) {
      int64_t keys = std::min<int64_t>(s.pos0 + std::min<int64_t>(row0 + R, s.nq), s.nk);
      for (int64_t h = 0; h < a.hq; ++h) items.push_back({int32_t(si), int32_t(h), int32_t(row0), keys});
    }
  }
  // longest first, handed out one at a time: causal tiles differ in cost by the key count
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.keys > y.keys; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(items.size())));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    for (size_t i; (i = next.fetch_add(1)) < items.size();) {
      const Item& it = items[i];
      tile<NV>(a, seqs[it.seq], it.head, it.row0, scratch);
    }
  });
}

at::Tensor fixed_order_attention(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, at::Tensor out,
                                 const at::Tensor& seqs, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && kt.dim() == 4 && v.dim() == 4 && out.dim() == 4, "q, kt, v, out must be 4-D");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &kt, &v, &out})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32 CPU tensors only");
  TORCH_CHECK(q.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(kt.is_contiguous(), "kt must be contiguous [B, Hkv, D, Tkp]");
  const int64_t d = q.size(3);
  TORCH_CHECK(d % 16 == 0 && d <= 256 && kt.size(2) == d && v.size(3) == d && out.size(3) == d,
              "head dimension must be a multiple of 16 up to 256 and agree across q, kt, v, out");
  TORCH_CHECK(q.size(1) % kt.size(1) == 0 && kt.size(1) == v.size(1), "query heads must be a multiple of kv heads");
  TORCH_CHECK(seqs.dim() == 2 && seqs.size(1) == 6 && seqs.scalar_type() == at::kLong, "seqs must be int64 [S, 6]");
  at::Tensor sq = seqs.contiguous();
  std::vector<Seq> list(sq.size(0));
  std::memcpy(list.data(), sq.data_ptr<int64_t>(), sizeof(Seq) * list.size());
  for (const Seq& s : list) {
    TORCH_CHECK(s.b >= 0 && s.b < q.size(0) && s.nq >= 0 && s.q0 >= 0 && s.q0 + s.nq <= q.size(2) && s.nk >= 0 &&
                    s.k0 >= 0 && s.k0 + s.nk <= v.size(2) && s.pos0 >= 0,
                "a sequence row points outside q or v");
    int64_t hi = std::min(s.pos0 + s.nq, s.nk);
    TORCH_CHECK(s.k0 + (hi + KB - 1) / KB * KB <= kt.size(3), "kt is not padded to the last key block");
  }
  Args a{q.data_ptr<float>(), kt.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
         {q.stride(0), q.stride(1), q.stride(2)}, {kt.stride(0), kt.stride(1)},
         {v.stride(0), v.stride(1), v.stride(2)}, {out.stride(0), out.stride(1), out.stride(2)},
         q.size(1), kt.size(1), kt.size(3), float(scale), window};
  // head dims in units of 16 floats; NV = vectors of L lanes
  switch (d / 16) {
    case 1: run<16 / L>(a, list); break;
    case 2: run<32 / L>(a, list); break;
    case 3: run<48 / L>(a, list); break;
    case 4: run<64 / L>(a, list); break;
    case 5: run<80 / L>(a, list); break;
    case 6: run<96 / L>(a, list); break;
    case 8: run<128 / L>(a, list); break;
    case 16: run<256 / L>(a, list); break;
    default: TORCH_CHECK(false, "head dimension ", d, " has no instantiation (16, 32, 48, 64, 80, 96, 128, 256)");
  }
  return out;
}


int64_t vector_lanes() { return L; }

}  // namespace

TORCH_LIBRARY(rmserve_cpu, m) {
  m.def("vector_lanes() -> int", &vector_lanes);
  m.def("fixed_order_attention(Tensor q, Tensor kt, Tensor v, Tensor(a!) out, Tensor seqs, float scale, int window)"
        " -> Tensor(a!)");
  m.impl("fixed_order_attention", c10::DispatchKey::CPU, TORCH_FN(fixed_order_attention));
}
