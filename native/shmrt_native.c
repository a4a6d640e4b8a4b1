#define _POSIX_C_SOURCE 200809L
#include "shmrt_native.h"

#include <stdatomic.h>
#include <string.h>
#include <time.h>

uint64_t shmrt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* off + n <= len, written so that it cannot overflow. */
static int in_bounds(uint64_t len, uint64_t off, uint64_t n) {
    return off <= len && n <= len - off;
}

int shmrt_copy_in(uint8_t *dst, uint64_t dst_len, uint64_t dst_off,
                  const uint8_t *src, uint64_t n, shmrt_span *span) {
    if (!in_bounds(dst_len, dst_off, n)) return SHMRT_E_BOUNDS;
    span->start_ns = shmrt_now_ns();
    memcpy(dst + dst_off, src, (size_t)n);
    span->end_ns = shmrt_now_ns();
    return SHMRT_OK;
}

int shmrt_copy_out(uint8_t *dst, const uint8_t *src, uint64_t src_len, uint64_t src_off,
                   uint64_t n, shmrt_span *span) {
    if (!in_bounds(src_len, src_off, n)) return SHMRT_E_BOUNDS;
    span->start_ns = shmrt_now_ns();
    memcpy(dst, src + src_off, (size_t)n);
    span->end_ns = shmrt_now_ns();
    return SHMRT_OK;
}

/* Header words are shared with an untrusted peer: the only guarantees we need are that
 * the word is read/written in one indivisible access and ordered against the data area
 * (acquire on load, release on store). Misaligned words would break atomicity. */
int shmrt_load_acquire(const uint8_t *base, uint64_t base_len, uint64_t off, uint64_t *value) {
    if (!in_bounds(base_len, off, 8)) return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + off)) % 8 != 0) return SHMRT_E_ALIGN;
    *value = atomic_load_explicit((const _Atomic uint64_t *)(base + off), memory_order_acquire);
    return SHMRT_OK;
}

int shmrt_store_release(uint8_t *base, uint64_t base_len, uint64_t off, uint64_t value) {
    if (!in_bounds(base_len, off, 8)) return SHMRT_E_BOUNDS;
    if (((uintptr_t)(base + off)) % 8 != 0) return SHMRT_E_ALIGN;
    atomic_store_explicit((_Atomic uint64_t *)(base + off), value, memory_order_release);
    return SHMRT_OK;
}
