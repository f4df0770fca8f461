/* timer-compute.c - ring-3 compute interrupted by a 1 kHz PIT.
 * Why: the digest folds the user RIP and loop counter seen by every IRQ0, so it depends on
 * exactly where each interrupt landed.  A replay (or a secondary) that injects an interrupt
 * one instruction early or late produces a different digest.  The compute itself does no I/O.
 * ITERATIONS is a build knob (Makefile); timer-compute-short is the same code, fewer loops. */
#include "lk.h"

#ifndef ITERATIONS
#define ITERATIONS 900000000ul
#endif
#ifndef GUEST_NAME
#define GUEST_NAME "timer-compute"
#endif

static volatile uint64_t progress;          /* written by ring 3, sampled by IRQ0 */
static uint64_t irq_digest = FNV_OFFSET;    /* ring 0 only */
static uint64_t user_x;

static void on_tick(struct lk_frame *f) {
    irq_digest = lk_mix(lk_mix(irq_digest, f->rip), progress);
}

static void task(uint64_t seed) {
    uint64_t x = seed;
    for (uint64_t i = 0; i < ITERATIONS; i++) {
        x = (x ^ i) * FNV_PRIME;
        x ^= x >> 29;
        progress = i;
    }
    user_x = x;
    uprintf("compute done: x=%016lx\n", x);
    sys_exit(0);
}

void kmain(void) {
    kprintf("%s: %lu iterations in ring 3, PIT at 1 kHz\n", GUEST_NAME, (uint64_t)ITERATIONS);
    tick_start(1000, on_tick);
    uint64_t st = lk_user_run(task, FNV_OFFSET, LK_USER_STACK_TOP);   /* returns with IF=0 */
    uint64_t ticks = lk_ticks;
    kprintf("ticks=%lu user_status=%lu\n", ticks, st);
    lk_result_hex(GUEST_NAME, lk_mix(lk_mix(irq_digest, user_x), ticks), (uint8_t)st);
}
