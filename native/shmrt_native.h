/* shmrt native helper: timed copies into/out of the ring and atomics on its header words.
 *
 * Plain C11, no Python headers. The build script (build_native.py) reads the declarations
 * below (between the CDEF markers) into cffi's cdef(), so this header is the one source of
 * truth for the ABI.
 *
 * Return codes (mapped to Python exceptions in shmrt/native.py, nowhere else):
 *   SHMRT_OK             0  done
 *   SHMRT_E_BOUNDS      -1  [offset, offset+n) does not lie inside the buffer
 *   SHMRT_E_ALIGN       -2  a header word is not 8-byte aligned
 */
#ifndef SHMRT_NATIVE_H
#define SHMRT_NATIVE_H
#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */
#define SHMRT_OK 0
#define SHMRT_E_BOUNDS -1
#define SHMRT_E_ALIGN -2

typedef struct {
    uint64_t start_ns;  /* CLOCK_MONOTONIC before the first byte moved */
    uint64_t end_ns;    /* CLOCK_MONOTONIC after the last byte moved */
} shmrt_span;

uint64_t shmrt_now_ns(void);

/* Copy n bytes from src into dst[dst_off .. dst_off+n), dst being dst_len bytes long. */
int shmrt_copy_in(uint8_t *dst, uint64_t dst_len, uint64_t dst_off,
                  const uint8_t *src, uint64_t n, shmrt_span *span);

/* Copy n bytes from src[src_off .. src_off+n), src being src_len bytes long, into dst. */
int shmrt_copy_out(uint8_t *dst, const uint8_t *src, uint64_t src_len, uint64_t src_off,
                   uint64_t n, shmrt_span *span);

/* Acquire load / release store of a 64-bit word at base+off (base_len bytes mapped). */
int shmrt_load_acquire(const uint8_t *base, uint64_t base_len, uint64_t off, uint64_t *value);
int shmrt_store_release(uint8_t *base, uint64_t base_len, uint64_t off, uint64_t value);
/* CDEF-END */

#endif
