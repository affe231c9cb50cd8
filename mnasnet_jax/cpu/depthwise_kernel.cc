// Depthwise convolution (NHWC, float32, 'SAME' padding given as top/left offsets) and both of its
// gradients as XLA:CPU custom calls. XLA:CPU emits the kernel gradient's per-channel sums over every
// pixel as scalar loops that stride across channels; here each sum runs along the contiguous
// channel axis, which the compiler vectorises, and the batch is split over XLA's intra-op threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, kh, kw, out_h, out_w, stride, top, left;
};

Geometry MakeGeometry(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& kernel, int64_t out_h,
                      int64_t out_w, int64_t stride, int64_t top, int64_t left) {
  auto xd = x.dimensions();
  auto kd = kernel.dimensions();
  return {xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], out_h, out_w, stride, top, left};
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& kernel) {
  if (x.dimensions().size() != 4 || kernel.dimensions().size() != 4 ||
      kernel.dimensions()[2] != 1 || kernel.dimensions()[3] != x.dimensions()[3]) {
    return ffi::Error::InvalidArgument(
        "depthwise_kernel: expected x [N, H, W, C] and kernel [kh, kw, 1, C]");
  }
  return ffi::Error::Success();
}

// Runs body(first, last) over [0, count) in up to `pool.num_threads() + 1` parts. The calling
// thread works too and takes whatever parts the pool has not started, so the call never waits on
// a pool that is busy elsewhere; parts still queued when the work is done find nothing left.
void ParallelFor(ffi::ThreadPool& pool, int64_t count,
                 const std::function<void(int64_t, int64_t)>& body) {
  int64_t parts = std::min<int64_t>(count, std::max<int64_t>(1, pool.num_threads()));
  if (parts <= 1) {
    body(0, count);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  // `body` lives on the caller's stack: a part may only use it after claiming work, and the
  // caller returns only when every claimed part is done.
  auto run = [state, parts, count, &body]() {
    for (int64_t part; (part = state->next.fetch_add(1)) < parts;) {
      body(part * count / parts, (part + 1) * count / parts);
      if (state->done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t i = 1; i < parts; ++i) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == parts; });
}

// y[n, oh, ow, c] = sum_{i, j} x[n, oh*s + i - top, ow*s + j - left, c] * k[i, j, c], for the
// output rows [row0, row1) of all images counted together (so one image splits over threads too).
void Forward(const Geometry& g, const float* x, const float* k, float* y, int64_t row0,
             int64_t row1) {
  const int64_t c = g.c;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      float* out = y + ((n * g.out_h + oh) * g.out_w + ow) * c;
      std::fill(out, out + c, 0.0f);
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.stride + i - g.top;
        if (ih < 0 || ih >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = ow * g.stride + j - g.left;
          if (iw < 0 || iw >= g.w) continue;
          const float* in = x + ((n * g.h + ih) * g.w + iw) * c;
          const float* tap = k + (i * g.kw + j) * c;
          for (int64_t ch = 0; ch < c; ++ch) out[ch] += in[ch] * tap[ch];
        }
      }
    }
  }
}

// dx[n, ih, iw, c] = sum over the taps (i, j) whose output (oh, ow) reads (ih, iw) of
// dy[n, oh, ow, c] * k[i, j, c];  dk_part[i, j, c] += x[n, ih, iw, c] * dy[n, oh, ow, c].
void Backward(const Geometry& g, const float* x, const float* k, const float* dy, float* dx,
              float* dk_part, int64_t n0, int64_t n1) {
  const int64_t c = g.c;
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(dx + n * g.h * g.w * c, dx + (n + 1) * g.h * g.w * c, 0.0f);
    for (int64_t oh = 0; oh < g.out_h; ++oh) {
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const float* grad = dy + ((n * g.out_h + oh) * g.out_w + ow) * c;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = oh * g.stride + i - g.top;
          if (ih < 0 || ih >= g.h) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t iw = ow * g.stride + j - g.left;
            if (iw < 0 || iw >= g.w) continue;
            const int64_t offset = ((n * g.h + ih) * g.w + iw) * c;
            const float* in = x + offset;
            float* din = dx + offset;
            const float* tap = k + (i * g.kw + j) * c;
            float* dtap = dk_part + (i * g.kw + j) * c;
            for (int64_t ch = 0; ch < c; ++ch) {
              din[ch] += grad[ch] * tap[ch];
              dtap[ch] += in[ch] * grad[ch];
            }
          }
        }
      }
    }
  }
}

ffi::Error DepthwiseForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                                int64_t stride, int64_t top, int64_t left) {
  if (ffi::Error error = CheckShapes(x, kernel); error.failure()) return error;
  auto yd = y->dimensions();
  const Geometry g = MakeGeometry(x, kernel, yd[1], yd[2], stride, top, left);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, g.n * g.out_h,
              [&](int64_t row0, int64_t row1) { Forward(g, xp, kp, yp, row0, row1); });
  return ffi::Error::Success();
}

ffi::Error DepthwiseBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                                 int64_t stride, int64_t top, int64_t left) {
  if (ffi::Error error = CheckShapes(x, kernel); error.failure()) return error;
  auto dyd = dy.dimensions();
  const Geometry g = MakeGeometry(x, kernel, dyd[1], dyd[2], stride, top, left);
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t parts = std::min<int64_t>(g.n, std::max<int64_t>(1, pool.num_threads()));
  // One kernel-gradient accumulator per part of the batch, summed at the end.
  std::vector<float> partial(parts * taps, 0.0f);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* dyp = dy.typed_data();
  float* dxp = dx->typed_data();
  ParallelFor(pool, parts, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      Backward(g, xp, kp, dyp, dxp, partial.data() + p * taps, p * g.n / parts,
               (p + 1) * g.n / parts);
    }
  });
  float* dkp = dk->typed_data();
  std::fill(dkp, dkp + taps, 0.0f);
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t t = 0; t < taps; ++t) dkp[t] += partial[p * taps + t];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MnasDepthwiseForward, DepthwiseForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MnasDepthwiseBackward, DepthwiseBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left"));
