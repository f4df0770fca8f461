/* triple-fault.c - deliberately triple-faults.
 * Why: tests check that the VMM reports a triple fault / shutdown clearly instead of hanging
 * or looping.  A zero-limit IDT makes #UD unroutable -> #GP -> #DF -> shutdown.
 * Prints no RESULT line and never reaches debug-exit. */
#include "lk.h"

void kmain(void) {
    kprintf("triple-fault: loading a zero-limit IDT and executing ud2\n");
    static const struct __attribute__((packed)) { uint16_t limit; uint64_t base; } empty = { 0, 0 };
    __asm__ volatile("cli; lidt %0; ud2" :: "m"(empty));
    for (;;) { }
}
