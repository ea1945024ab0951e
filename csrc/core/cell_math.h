// The LSTM gate and cell math, forward and backward, for one hidden unit.
// This header is the single source of truth for the elementwise math: the CPU
// kernels instantiate it with scalars and with at::vec::Vectorized, the CUDA
// kernels with scalars on the device. Gate order is i, f, g, o (as nn.LSTM).
//
// T is the math type: at::opmath_type<scalar_t> (float for half/bfloat16).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace fused_lstm {

// Activation primitives: overloads for scalars (host and device) and, on the
// host, for at::vec::Vectorized so the same cell functions vectorise.
C10_HOST_DEVICE inline float act_exp(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double act_exp(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float act_tanh(float x) { return ::tanhf(x); }
C10_HOST_DEVICE inline double act_tanh(double x) { return ::tanh(x); }

#if !defined(__CUDACC__)
// double: Sleef's 1-ULP exp and tanh.
inline at::vec::Vectorized<double> act_exp(const at::vec::Vectorized<double>& x) { return x.exp(); }
inline at::vec::Vectorized<double> act_tanh(const at::vec::Vectorized<double>& x) { return x.tanh(); }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float, SIMD builds: e^x = 2^n e^r, n = floor(x log2(e) + 1/2), r = x - n ln 2 in
// [-ln2 / 2, ln2 / 2], e^r by a degree-5 polynomial fitted for relative error (2e-7 at
// most in float32 arithmetic), 2^n built in the exponent bits. x is first clamped to
// [-87, 88], where e^x stays a normal float, by clamp_min / clamp_max, which keep NaN:
// a NaN x makes the polynomial NaN, whatever 2^n its n converts to.
// ATen's exp_u20 (below) clamps NaN to a number, so it needed a blend to put NaN back.
inline at::vec::Vectorized<float> act_exp(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec c = at::vec::clamp_min(at::vec::clamp_max(x, Vec(88.f)), Vec(-87.f));
  const Vec n = at::vec::fmadd(c, Vec(1.44269504f), Vec(0.5f)).floor();
  const Vec r = at::vec::fnmadd(n, Vec(0.693147182f), c);
  Vec p = at::vec::fmadd(Vec(0.00829752441f), r, Vec(0.0419151001f));
  p = at::vec::fmadd(p, r, Vec(0.166675746f));
  p = at::vec::fmadd(p, r, Vec(0.499988973f));
  p = at::vec::fmadd(p, r, Vec(0.999999702f));
  p = at::vec::fmadd(p, r, Vec(1.00000012f));
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + at::vec::Vectorized<int32_t>(127))
                    << at::vec::Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(bits);
}
#else
// float: ATen's polynomial exp_u20, about twice as fast as Sleef's exp and four
// times its tanh, within ~1e-6 relative (float32 LSTMs agree with nn.LSTM to
// ~1e-6; the tests hold 1e-5). exp_u20 clamps, so NaN is put back explicitly.
inline at::vec::Vectorized<float> act_exp(const at::vec::Vectorized<float>& x) {
  return at::vec::Vectorized<float>::blendv(x.exp_u20(), x, x.isnan());
}
#endif
// tanh(x) = 1 - 2 / (1 + exp(2x)): exact at both tails, ~1e-7 absolute near 0.
inline at::vec::Vectorized<float> act_tanh(const at::vec::Vectorized<float>& x) {
  const at::vec::Vectorized<float> one(1.f), two(2.f);
  return one - two / (one + act_exp(two * x));
}
#endif

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T act_sigmoid(const T& x) {
  return T(1) / (T(1) + act_exp(T(0) - x));
}

// Forward for one unit, in two halves (a kernel that computes gates i, f before g, o
// runs them apart; cell_forward runs both).
//   in:  i, f, g, o pre-activations (x W_ih^T + h W_hh^T + b), c_prev
//   out: i, f, g, o activated (kept for backward), c, h = o * tanh(c)
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cell_forward_input_forget(T& i, T& f) {
  i = act_sigmoid(i);
  f = act_sigmoid(f);
}

// i, f activated (cell_forward_input_forget); g, o pre-activations in, activated out.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cell_forward_output(
    const T& i, const T& f, T& g, T& o, const T& c_prev, T& c, T& h) {
  g = act_tanh(g);
  o = act_sigmoid(o);
  c = f * c_prev + i * g;
  h = o * act_tanh(c);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cell_forward(
    T& i, T& f, T& g, T& o, const T& c_prev, T& c, T& h) {
  cell_forward_input_forget(i, f);
  cell_forward_output(i, f, g, o, c_prev, c, h);
}

// Backward for one unit, from the activated gates saved by cell_forward.
//   in:  i, f, g, o (activated), c_prev, c, dh = dL/dh, dc = dL/dc from step t+1
//   out: di, df, dg, do_ = dL/d(pre-activation), dc_prev = dL/dc_prev
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cell_backward(
    const T& i, const T& f, const T& g, const T& o,
    const T& c_prev, const T& c, const T& dh, const T& dc,
    T& di, T& df, T& dg, T& do_, T& dc_prev) {
  const T one(1);
  const T tanh_c = act_tanh(c);
  const T dc_total = dc + dh * o * (one - tanh_c * tanh_c);
  do_ = dh * tanh_c * o * (one - o);
  di = dc_total * g * i * (one - i);
  df = dc_total * c_prev * f * (one - f);
  dg = dc_total * i * (one - g * g);
  dc_prev = dc_total * f;
}

}  // namespace fused_lstm
