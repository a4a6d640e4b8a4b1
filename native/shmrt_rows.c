/* shmrt native helper, the enclave's side: one row of a decode step's residual and RMSNorm in one pass
 * (shmrt/enclave/llama.py drives it through shmrt/wire/native.py). No shared memory is written here;
 * `delta` may be a reply still in the response ring, read once per element. */
#include "shmrt_native.h"

#include <math.h>

int shmrt_residual_rms_norm(uint64_t h_at, uint64_t delta_at, uint64_t weight_at, uint64_t out_at, uint64_t n,
                            double eps) {
    float *h = (float *)(uintptr_t)h_at, *out = (float *)(uintptr_t)out_at;
    const float *delta = (const float *)(uintptr_t)delta_at, *weight = (const float *)(uintptr_t)weight_at;
    /* Four partial sums of squares in double: a finite float32's square and any sum of 2^40 of them stay
       finite there, so the total is finite exactly when every h[i] is. */
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    uint64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float a = h[i], b = h[i + 1], c = h[i + 2], d = h[i + 3];
        if (delta) {
            a += delta[i]; b += delta[i + 1]; c += delta[i + 2]; d += delta[i + 3];
            h[i] = a; h[i + 1] = b; h[i + 2] = c; h[i + 3] = d;
        }
        s0 += (double)a * a; s1 += (double)b * b; s2 += (double)c * c; s3 += (double)d * d;
    }
    for (; i < n; i++) {
        float a = h[i];
        if (delta) h[i] = a = a + delta[i];
        s0 += (double)a * a;
    }
    double total = (s0 + s1) + (s2 + s3);
    if (out && n) {
        /* HF's LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight, rounded in this order: x * weight first, then
           times the scale as a float32 (as the numpy path it replaced; within a few ulps of HF's float32 order). */
        float scale = (float)(1.0 / sqrt(total / (double)n + eps));
        for (i = 0; i < n; i++) out[i] = (h[i] * weight[i]) * scale;
    }
    return isfinite(total) ? 1 : 0;
}
