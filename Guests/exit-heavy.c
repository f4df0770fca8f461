/* exit-heavy.c - 20,000 port accesses in a tight ring-0 loop.
 * Why: a benchmark for the cost of I/O exits (exits per second).  The UART scratch register
 * (0x3FF) is a deterministic device register: each write is read back and checked. */
#include "lk.h"

void kmain(void) {
    kprintf("exit-heavy: 10000 x (write + read) of the UART scratch register\n");
    uint64_t d = FNV_OFFSET, bad = 0;
    for (uint32_t i = 0; i < 10000; i++) {
        outb(COM1 + 7, (uint8_t)(i * 7));
        uint8_t v = inb(COM1 + 7);
        bad += v != (uint8_t)(i * 7);
        d = lk_mix(d, v);
    }
    kprintf("mismatches=%lu\n", bad);
    lk_result_hex("exit-heavy", d, bad ? 1 : 0);
}
