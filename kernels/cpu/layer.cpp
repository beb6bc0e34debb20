// One decoder layer of a step (decode rows and prefill chunks alike, over a bf16 or a
// float8_e4m3fn KV cache) in a single call: the same kernels the model calls op by op
// (rmsnorm.cpp, int4_linear.cpp, rope.cpp, kv_cache.cpp, paged_attention.cpp, activation.cpp),
// in the same order on the same buffers, so the result is bit for bit the op-by-op one.
// What it saves is Python: a batch-1 step of SmolLM2 made ~330 kernel calls and spent about
// half its time between them (kernels/layer_cpu.py).
#include <cstdint>
#include <cstring>

extern "C" {
void baton_rms_norm_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                         uint16_t* out, uint16_t* summed, int64_t rows, int64_t hidden, float eps,
                         int threads);
void baton_int4_linear_avx2(const void* x, const uint8_t* qweight, const uint16_t* scales,
                            const uint8_t* zeros, void* y, int bf16, int64_t m, int64_t n,
                            int64_t k, int64_t group, int threads);
void baton_rope_bf16(const uint16_t* src, int64_t src_stride, uint16_t* dst, const float* cos,
                     const float* sin, int64_t tokens, int64_t heads, int64_t head_dim,
                     int threads);
void baton_write_kv_bf16(const uint16_t* k, int64_t k_stride, const uint16_t* v,
                         int64_t v_stride, uint16_t* cache, int64_t block_stride,
                         int64_t kv_stride, int64_t block_size, const int64_t* slots,
                         int64_t tokens, int64_t row_elems);
void baton_write_kv_fp8(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride,
                        uint8_t* cache, int64_t block_stride, int64_t kv_stride,
                        int64_t block_size, const int64_t* slots, int64_t tokens,
                        int64_t kv_heads, int64_t head_dim, const float* kv_scales);
void baton_paged_attention_bf16(const uint16_t* q, uint16_t* out, const uint16_t* cache,
                                int64_t block_stride, int64_t kv_stride,
                                const int32_t* block_tables, int64_t table_stride,
                                const int32_t* query_start, const int32_t* seq_lens, int64_t seqs,
                                int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t block_size, float scale, int threads);
void baton_paged_attention_fp8(const uint16_t* q, uint16_t* out, const uint8_t* cache,
                               int64_t block_stride, int64_t kv_stride,
                               const int32_t* block_tables, int64_t table_stride,
                               const int32_t* query_start, const int32_t* seq_lens, int64_t seqs,
                               int64_t heads, int64_t kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, const float* kv_scales,
                               int threads);
void baton_silu_and_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t inter,
                             int threads);
}

// Field order and types match kernels/layer_cpu.py's ctypes structures.
struct Int4Proj {
  const uint8_t* qweight;
  const uint16_t* scales;
  const uint8_t* zeros;
  int64_t n, k, group;
};

struct LayerWeights {
  const uint16_t* input_norm;
  const uint16_t* post_norm;
  Int4Proj qkv, o, gate_up, down;
  void* cache;  // this layer's [blocks, 2, block_size, kv_heads, head_dim], bf16 or e4m3
  const float* kv_scales;  // [2 (K|V), kv_heads] of an e4m3 cache (checked), else null
};

struct LayerStep {
  int64_t tokens, hidden, heads, kv_heads, head_dim, inter;
  float eps, scale;
  int threads;
  int first;  // 1 before the first layer: x is also the residual stream
  const float* cos;  // [tokens, head_dim / 2]
  const float* sin;
  const int64_t* slots;
  const int32_t* block_tables;
  int64_t table_stride;
  int64_t seqs;
  const int32_t* query_start;  // [seqs + 1]: sequence b owns rows query_start[b] ..
  const int32_t* seq_lens;
  int64_t block_stride, kv_stride, block_size;
  // bf16 buffers, row-major with `tokens` rows: x [hidden] (the layer's input, then its
  // output), residual [hidden], h [hidden], qkv [q + 2 kv], q [q], k [kv], attn [q],
  // gate_up [2 inter], act [inter]
  uint16_t *x, *residual, *h, *qkv, *q, *k, *attn, *gate_up, *act;
};

namespace {

void project(const Int4Proj& w, const uint16_t* x, uint16_t* y, const LayerStep& s) {
  baton_int4_linear_avx2(x, w.qweight, w.scales, w.zeros, y, 1, s.tokens, w.n, w.k, w.group,
                         s.threads);
}

}  // namespace

// x (and residual) in, x (and residual) out. The norms add in place: the kernel reads a
// row of x and of the residual before it writes that row of the sum, and reads the sum
// before it writes that row of the output.
extern "C" void baton_layer_bf16(const LayerWeights* layer, LayerStep* step) {
  const LayerWeights& l = *layer;
  LayerStep& s = *step;
  const int64_t t = s.tokens, q_size = s.heads * s.head_dim, kv_size = s.kv_heads * s.head_dim;
  const int64_t width = q_size + 2 * kv_size;
  if (s.first) {  // the op-by-op model keeps x itself as the residual: the same values
    std::memcpy(s.residual, s.x, t * s.hidden * sizeof(uint16_t));
    baton_rms_norm_bf16(s.x, nullptr, l.input_norm, s.h, s.x, t, s.hidden, s.eps, s.threads);
    s.first = 0;
  } else {
    baton_rms_norm_bf16(s.x, s.residual, l.input_norm, s.h, s.residual, t, s.hidden, s.eps,
                        s.threads);
  }
  project(l.qkv, s.h, s.qkv, s);
  baton_rope_bf16(s.qkv, width, s.q, s.cos, s.sin, t, s.heads, s.head_dim, s.threads);
  baton_rope_bf16(s.qkv + q_size, width, s.k, s.cos, s.sin, t, s.kv_heads, s.head_dim, s.threads);
  const uint16_t* v = s.qkv + q_size + kv_size;
  if (l.kv_scales) {
    uint8_t* cache = static_cast<uint8_t*>(l.cache);
    baton_write_kv_fp8(s.k, kv_size, v, width, cache, s.block_stride, s.kv_stride, s.block_size,
                       s.slots, t, s.kv_heads, s.head_dim, l.kv_scales);
    baton_paged_attention_fp8(s.q, s.attn, cache, s.block_stride, s.kv_stride, s.block_tables,
                              s.table_stride, s.query_start, s.seq_lens, s.seqs, s.heads,
                              s.kv_heads, s.head_dim, s.block_size, s.scale, l.kv_scales,
                              s.threads);
  } else {
    uint16_t* cache = static_cast<uint16_t*>(l.cache);
    baton_write_kv_bf16(s.k, kv_size, v, width, cache, s.block_stride, s.kv_stride, s.block_size,
                        s.slots, t, kv_size);
    baton_paged_attention_bf16(s.q, s.attn, cache, s.block_stride, s.kv_stride, s.block_tables,
                               s.table_stride, s.query_start, s.seq_lens, s.seqs, s.heads,
                               s.kv_heads, s.head_dim, s.block_size, s.scale, s.threads);
  }
  project(l.o, s.attn, s.x, s);
  baton_rms_norm_bf16(s.x, s.residual, l.post_norm, s.x, s.residual, t, s.hidden, s.eps,
                      s.threads);
  project(l.gate_up, s.x, s.gate_up, s);
  baton_silu_and_mul_bf16(s.gate_up, s.act, t, s.inter, s.threads);
  project(l.down, s.act, s.x, s);
}
