/* idle.c - a guest that mostly sleeps: sti;hlt until 500 PIT ticks at 1 kHz.
 * Why: exercises HLT exits and interrupt injection into a halted vCPU; the PIT latch read on
 * every wakeup is a logged device read, so the digest checks replay of both. */
#include "lk.h"

void kmain(void) {
    kprintf("idle: hlt until 500 ticks at 1 kHz\n");
    uint64_t d = FNV_OFFSET, wakeups = 0;
    tick_start(1000, NULL);
    cli();
    while (lk_ticks < 500) {
        sti_hlt();                          /* the interrupt shadow keeps the wakeup */
        cli();
        wakeups++;
        d = lk_mix(lk_mix(d, lk_ticks), pit_read0());
    }
    kprintf("ticks=%lu wakeups=%lu\n", lk_ticks, wakeups);
    lk_result_hex("idle", lk_mix(d, wakeups), 0);
}
