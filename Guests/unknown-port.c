/* unknown-port.c - touches ports no device claims.
 * Why: the VMM must treat unclaimed ports like a PC bus does (reads float to 0xFF, writes
 * vanish) instead of failing the run.  Exit status 1 if the read is not 0xFF. */
#include "lk.h"

void kmain(void) {
    uint8_t v = inb(0x1234);
    outb(0x1235, 0x5A);
    kprintf("unknown-port: inb(0x1234) = 0x%02x, wrote 0x5a to 0x1235\n", v);
    kprintf("RESULT unknown-port %02x\n", v);
    debug_exit(v == 0xFF ? 0 : 1);
}
