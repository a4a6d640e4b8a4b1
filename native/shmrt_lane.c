/* The daemon's planned calls (shmrt_native.h documents shmrt_lane; shmrt/host/lane.py fills the plans, host/graphs.py
 * makes them): a decode step's request whose record a plan knows, served from the take to the reply's post in one C
 * call (with the ZeroMQ doorbell, from the record that came over the socket to the reply's record, to send). The
 * daemon's code only: it is in the helper both sides load, and the enclave never calls it.
 *
 * Bytes crossing processes here: the request record (copied out of the request ring's slot once and checked by
 * shmrt_bell_take_record before any of its words is used; over ZeroMQ, a private copy checked by shmrt_record_check), an Embedding's id (read once from the request ring into a
 * local, then range-checked; the graph reads the local's copy, never the ring), the request ring's tail word (stored),
 * the response ring's head word, slot and seq word (stored by shmrt_publish and shmrt_bell_post_words). Everything
 * else (plans, K/V counts and generations, the producer's and consumer's states) is the daemon's private memory. */
#include "shmrt_native.h"

#include <stdatomic.h>
#include <string.h>

/* The plan whose key is the checked record's method, layer, op, tensor count and descriptors; NULL if none. */
static shmrt_plan *find_plan(const shmrt_lane *lane, const uint64_t *w) {
    uint64_t nt = w[8];
    uint32_t nkey = (uint32_t)(4 + nt * SHMRT_DESC_WORDS);
    for (uint32_t i = 0; i < lane->n_plans; i++) {
        shmrt_plan *p = &lane->plans[i];
        if (p->nkey != nkey || p->key[1] != w[3] || p->key[0] != w[0] || p->key[2] != w[4] || p->key[3] != nt)
            continue;
        if (memcmp(p->key + 4, w + SHMRT_HEAD_WORDS, (size_t)nt * SHMRT_DESC_WORDS * 8) == 0) return p;
    }
    return NULL;
}

/* Whether the session's state answers as it did when the plan was made (graphs.py's Plan.ready); an Embedding's id
 * is read here, once, into *id. */
static int ready(const shmrt_lane *lane, const shmrt_plan *p, uint64_t pos, int64_t *id) {
    switch (p->kind) {
    case SHMRT_PLAN_PLAIN:
    case SHMRT_PLAN_ECHO:
        return 1;
    case SHMRT_PLAN_SCORES:
        return pos < p->width && *p->filled[0] == (int64_t)pos && *p->filled[1] == (int64_t)pos
               && *p->generation[0] == p->expect_generation[0] && *p->generation[1] == p->expect_generation[1];
    case SHMRT_PLAN_OUTPUT:
        return *p->filled[0] > 0 && (uint64_t)*p->filled[0] <= p->width
               && *p->generation[0] == p->expect_generation[0];
    case SHMRT_PLAN_EMBEDDING: {
        uint64_t at = lane->request_data + p->id_offset;
        if ((p->id_bytes != 4 && p->id_bytes != 8) || at > lane->request_len || p->id_bytes > lane->request_len - at)
            return 0;
        /* once (an atomic load: the client may rewrite it meanwhile; what is checked is what the graph reads) */
        if (p->id_bytes == 8)
            *id = (int64_t)atomic_load_explicit((const _Atomic uint64_t *)(lane->request_base + at), memory_order_relaxed);
        else
            *id = (int32_t)atomic_load_explicit((const _Atomic uint32_t *)(lane->request_base + at), memory_order_relaxed);
        return *id >= 0 && (uint64_t)*id < p->vocab;
    }
    default:
        return 0;
    }
}

/* An echo plan's run: each request tensor (the checked record's descriptors, inside the request ring's capacity)
 * copied to the reply's descriptor of the same index (the plan's words, where the reservation just landed). The
 * client may rewrite its bytes meanwhile: they are copied, never interpreted. */
static int64_t echo(const shmrt_lane *lane, const uint64_t *w, const uint64_t *r) {
    const shmrt_producer *prod = lane->producer;
    for (uint64_t i = 0; i < w[8]; i++) {
        const uint64_t *q = w + SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS, *d = r + SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS;
        uint64_t from = lane->request_data + q[0], to = lane->reply_data + d[0], n = q[1];
        if (n != d[1] || from > lane->request_len || n > lane->request_len - from || to > prod->base_len
            || n > prod->base_len - to)
            return SHMRT_E_BOUNDS;
        memcpy(prod->base + to, lane->request_base + from, n);
    }
    return 0;
}

/* Serve a checked request record w by its plan: SHMRT_LANE_SERVED (published; *reply: the reply's record words, its
 * seq, ring end and work set), SHMRT_OK (no plan answers it: nothing changed), SHMRT_E_RUN or a publish's error. */
static int serve_checked(shmrt_lane *lane, const uint64_t *w, const uint64_t **reply) {
    if (w[9] != 0) return SHMRT_OK;   /* a text (no planned call has one): Python checks it is UTF-8 */
    shmrt_plan *p = find_plan(lane, w);
    if (p == NULL || p->places < 1 || p->places > 2) return SHMRT_OK;
    shmrt_consumer *c = lane->consumer;
    uint64_t pos = w[5], end = w[6], cap = lane->requests->capacity;
    if (!shmrt_consumer_takes_only(c, end, cap)) return SHMRT_OK;
    int64_t id = 0;
    if (!ready(lane, p, pos, &id)) return SHMRT_OK;
    /* The reply's one reservation, where one of the plan's places is; else the producer as it was. */
    shmrt_producer *prod = lane->producer;
    if (prod->in_message) return SHMRT_OK;
    shmrt_producer before = *prod;
    int64_t at = shmrt_reserve(prod, p->reply_nbytes);
    uint32_t place = 0;
    while (place < p->places && (at < 0 || (uint64_t)at != p->reply_offset[place])) place++;
    if (place == p->places) {
        *prod = before;
        return SHMRT_OK;
    }
    if (p->kind == SHMRT_PLAN_SCORES) *p->word = (int64_t)pos;
    else if (p->kind == SHMRT_PLAN_EMBEDDING) *p->word = id;
    uint64_t start = shmrt_now_ns();
    int64_t run_rc;
    if (p->kind == SHMRT_PLAN_ECHO) run_rc = echo(lane, w, p->reply_words[place]);
    else if (p->exec[place] != NULL) run_rc = lane->launch(p->exec[place], lane->stream);
    else run_rc = lane->run(p->handle[place]);
    if (run_rc == 0 && lane->sync != NULL) run_rc = lane->sync(lane->stream);   /* a device's: its copies done */
    uint64_t work = shmrt_now_ns() - start;
    if (run_rc != 0) {
        lane->run_rc = run_rc;
        *prod = before;   /* nothing published: the reply's bytes were never the client's */
        return SHMRT_E_RUN;
    }
    if (p->kind == SHMRT_PLAN_SCORES) *p->filled[0] = *p->filled[1] = (int64_t)pos + 1;
    /* The request is done with: poisoned (tests), then handed back (its tail), as ring.py's Consumer.release does. */
    int rc = shmrt_consumer_release_only(c, lane->request_base, lane->request_len, lane->request_data,
                                         lane->request_tail_off, w + SHMRT_HEAD_WORDS, w[8], lane->poison, end);
    if (rc != SHMRT_OK) return rc;
    rc = shmrt_publish(prod);
    if (rc != SHMRT_OK) return rc;
    uint64_t *r = p->reply_words[place];
    r[2] = w[2];
    r[6] = prod->head;
    r[7] = work;
    *reply = r;
    lane->served++;
    if (p->exec[place] != NULL) lane->launched++;
    return SHMRT_LANE_SERVED;
}

/* (first: nothing changes before every word a serve stores to is known to be mapped) */
static int mapped(const shmrt_lane *lane) {
    return lane->requests != NULL && lane->request_tail_off <= lane->request_len
           && lane->request_len - lane->request_tail_off >= 8 && lane->producer->base != NULL;
}

int shmrt_lane_serve(shmrt_lane *lane, uint64_t expect_seq) {
    if (!mapped(lane)) return SHMRT_E_BOUNDS;
    int rc = shmrt_bell_take_record(lane->requests, expect_seq, 0, lane->request_words);
    if (rc != SHMRT_OK) return rc;
    const uint64_t *r;
    rc = serve_checked(lane, lane->request_words, &r);
    if (rc != SHMRT_LANE_SERVED) return rc;
    uint64_t flag, length;
    rc = shmrt_bell_post_words(lane->replies, r, "", 0, &flag, &length);
    return rc == SHMRT_OK ? SHMRT_LANE_SERVED : rc;
}

int shmrt_lane_serve_record(shmrt_lane *lane, const uint8_t *rec, uint64_t n, uint64_t expect_seq, uint8_t *out,
                            uint64_t out_cap, uint64_t *length) {
    if (!mapped(lane)) return SHMRT_E_BOUNDS;
    const shmrt_bell *b = lane->requests;
    int rc = shmrt_record_check(b->codec, rec, n, b->token, expect_seq, 0, b->capacity, lane->request_words);
    if (rc != SHMRT_OK) return rc;
    const uint64_t *r;
    rc = serve_checked(lane, lane->request_words, &r);
    if (rc != SHMRT_LANE_SERVED) return rc;
    rc = shmrt_record_encode(b->codec, b->token, r, "", 0, out, out_cap, length);
    return rc == SHMRT_OK ? SHMRT_LANE_SERVED : rc;
}
