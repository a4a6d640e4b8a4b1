/* The enclave's calls (shmrt/wire/shm_transport.py's ShmClient.call drives this; shmrt_native.h documents shmrt_call):
 * one C call from the first input's reservation to the reply's checked record, where the Python path takes ~15 C and
 * Python steps (reserve, copy, publish, encode, post, wait, take, check) of a few microseconds each. With the ZeroMQ
 * doorbell, two: the inputs to the encoded record (shmrt_call_encode), and the reply's record, as it came over the
 * socket, checked (shmrt_call_check).
 *
 * Bytes crossing processes here: the request ring's data (written: the copies), its head word, bell slot and seq word
 * (stored by shmrt_publish and shmrt_bell_post_words), its asleep word (loaded once, after the post's fence), its
 * consumer's tail word (loaded by shmrt_reserve, validated there); the response ring's seq word and slot (loaded and
 * copied once by shmrt_bell_await_record, the copy checked there), or a reply record that came over ZeroMQ (a private
 * copy, checked by shmrt_record_check). Nothing of a reply is used before that check. A reply shaped as expected is
 * accepted into the response ring's consumer here where nothing else is out (shmrt_ring.c's consumer helpers, the
 * bounds ring.py's Consumer.accept keeps), and released by shmrt_call_release (its tail word stored); any other is
 * Python's to accept. */
#include "shmrt_native.h"

#include <string.h>

/* Whether the checked reply r fixes what `expect` (an earlier reply's words) fixed: method, layer, op, tensor count and
 * descriptors, and no text. */
static int same_reply(const uint64_t *r, const uint64_t *expect) {
    return r[9] == 0 && r[0] == expect[0] && r[3] == expect[3] && r[4] == expect[4] && r[8] == expect[8]
           && r[8] <= SHMRT_MAX_TENSORS
           && memcmp(r + SHMRT_HEAD_WORDS, expect + SHMRT_HEAD_WORDS, (size_t)r[8] * SHMRT_DESC_WORDS * 8) == 0;
}

/* What t says of a reply record r the caller checked: whether it is shaped as one of expect's two, its end, its work;
 * one shaped so is accepted where the consumer has nothing else out (shmrt_native.h, shmrt_call_release). */
static void note_reply(shmrt_caller *c, const uint64_t *r, const uint64_t *expect, shmrt_call_times *t) {
    t->same_reply = expect == NULL ? 0
                    : same_reply(r, expect) ? 1
                    : same_reply(r, expect + SHMRT_RECORD_WORDS) ? 2 : 0;
    t->ring_end = r[6];
    t->work_ns = r[7];
    shmrt_consumer *k = c->reply_consumer;
    int taken = t->same_reply != 0 && k != NULL && shmrt_consumer_takes_only(k, r[6], c->replies->capacity);
    t->accepted = taken ? t->same_reply : 0;   /* (which of the two: the one field a client's hot path reads) */
    if (taken) {
        k->accepted_end = c->adopted_end = r[6];
        k->outstanding = 1;
        c->adopted_count = (uint32_t)r[8];   /* (same_reply bounds it by SHMRT_MAX_TENSORS) */
        if (c->poison) memcpy(c->adopted_descs, r + SHMRT_HEAD_WORDS, (size_t)r[8] * SHMRT_DESC_WORDS * 8);
    }
}

int shmrt_call_release(shmrt_caller *c) {
    shmrt_consumer *k = c->reply_consumer;
    const shmrt_bell *b = c->replies;
    uint64_t end = c->adopted_end;
    if (k == NULL || k->outstanding != 1 || k->accepted_end != end) return SHMRT_E_NONE;
    return shmrt_consumer_release_only(k, b->base, b->base_len, c->reply_data_off, c->reply_tail_off, c->adopted_descs,
                                       c->adopted_count, c->poison, end);
}

int shmrt_call_await(shmrt_caller *c, uint64_t seq, uint32_t method, const uint64_t *expect_reply, uint64_t rung_ns,
                     uint64_t budget_ns, shmrt_call_times *t) {
    const shmrt_backoff *b = c->last_wait_long ? &c->after_long : &c->backoff;
    int rc = shmrt_bell_await_record(c->replies, seq, method, b, shmrt_now_ns() - rung_ns, budget_ns, c->reply_words);
    t->t_replied = shmrt_now_ns();
    t->same_reply = t->accepted = 0;
    if (rc == SHMRT_E_NONE) return SHMRT_E_TIMEOUT;   /* the seq word changed and changed back: nothing new yet */
    if (rc != SHMRT_E_TIMEOUT) c->last_wait_long = t->t_replied - rung_ns > c->long_ns;
    t->received = c->replies->taken_length;
    if (rc == SHMRT_OK) note_reply(c, c->reply_words, expect_reply, t);
    return rc;
}

int shmrt_call_check(shmrt_caller *c, const uint8_t *rec, uint64_t n, uint64_t seq, uint32_t method,
                     const uint64_t *expect_reply, shmrt_call_times *t) {
    const shmrt_bell *b = c->replies;
    t->same_reply = t->accepted = 0;
    t->received = n;
    int rc = shmrt_record_check(b->codec, rec, n, b->token, seq, method, b->capacity, c->reply_words);
    if (rc == SHMRT_OK) note_reply(c, c->reply_words, expect_reply, t);
    return rc;
}

/* The inputs reserved and copied, the message published, seq, pos and ring end set in words (shmrt_call's first half,
 * both doorbells'). */
static int stage(shmrt_caller *c, uint64_t *words, const uint64_t *sources, uint64_t seq, uint64_t pos,
                 shmrt_call_times *t) {
    shmrt_producer *p = c->producer;
    uint64_t n = words[8];
    if (n > SHMRT_MAX_TENSORS || p->base == NULL) return SHMRT_E_BOUNDS;
    /* Reservations first, for every input still to copy: one refused (the ring full now, or never large enough, or a
     * scribbled tail) leaves the producer as it was, nothing written, for the Python path to wait or to word. */
    shmrt_producer before = *p;
    for (uint64_t i = 0; i < n; i++) {
        if (sources[i] == 0) continue;   /* staged in the ring already: its offset is in words */
        uint64_t *d = words + SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS;
        int64_t at = shmrt_reserve(p, d[1]);
        if (at < 0) {
            *p = before;
            return (int)at;
        }
        d[0] = (uint64_t)at;
    }
    uint64_t start = shmrt_now_ns(), copied = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (sources[i] == 0) continue;
        copied++;
        const uint64_t *d = words + SHMRT_HEAD_WORDS + i * SHMRT_DESC_WORDS;
        uint64_t to = c->request_data + d[0];
        if (to > p->base_len || d[1] > p->base_len - to) {   /* (reserve keeps offsets inside the capacity) */
            *p = before;
            return SHMRT_E_BOUNDS;
        }
        memcpy(p->base + to, (const void *)(uintptr_t)sources[i], (size_t)d[1]);
    }
    t->t_encoded = shmrt_now_ns();
    t->copy_ns = copied ? t->t_encoded - start : 0;
    int rc = shmrt_publish(p);
    if (rc != SHMRT_OK) return rc;
    words[2] = seq;
    words[5] = pos;
    words[6] = p->head;
    return SHMRT_OK;
}

int shmrt_call(shmrt_caller *c, uint64_t *words, const uint64_t *sources, uint64_t seq, uint64_t pos,
               const uint64_t *expect_reply, uint64_t budget_ns, shmrt_call_times *t) {
    int rc = stage(c, words, sources, seq, pos, t);
    if (rc != SHMRT_OK) return rc;
    uint64_t flag = 0;
    rc = shmrt_bell_post_words(c->requests, words, "", 0, &flag, &t->sent_length);
    t->t_sent = shmrt_now_ns();
    if (rc != SHMRT_OK) return rc;
    if (flag != 0) return SHMRT_CALL_ASLEEP;
    return shmrt_call_await(c, seq, (uint32_t)words[0], expect_reply, t->t_sent, budget_ns, t);
}

int shmrt_call_encode(shmrt_caller *c, uint64_t *words, const uint64_t *sources, uint64_t seq, uint64_t pos,
                      uint8_t *out, uint64_t out_cap, shmrt_call_times *t) {
    int rc = stage(c, words, sources, seq, pos, t);
    if (rc != SHMRT_OK) return rc;
    return shmrt_record_encode(c->requests->codec, c->requests->token, words, "", 0, out, out_cap, &t->sent_length);
}
