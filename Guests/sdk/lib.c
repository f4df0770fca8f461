/* lib.c - freestanding helpers shared by ring 0 and ring 3: mem*, a printf-lite, FNV-1a,
 * and the polled 16550 serial driver.
 * Why: guests link no libc; gcc may still emit memset/memcpy calls.  The formatter is pure
 * (no I/O) so ring-3 code can use it and print through SYS_WRITE. */
#include "lk.h"

void *memset(void *d, int c, size_t n) { uint8_t *p = d; while (n--) *p++ = (uint8_t)c; return d; }
void *memcpy(void *d, const void *s, size_t n) {
    uint8_t *a = d; const uint8_t *b = s; while (n--) *a++ = *b++; return d;
}
void *memmove(void *d, const void *s, size_t n) {
    uint8_t *a = d; const uint8_t *b = s;
    if (a < b) { while (n--) *a++ = *b++; } else { a += n; b += n; while (n--) *--a = *--b; }
    return d;
}
int memcmp(const void *x, const void *y, size_t n) {
    const uint8_t *a = x, *b = y;
    for (; n; n--, a++, b++) if (*a != *b) return *a - *b;
    return 0;
}
size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }

uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n--) { h ^= *b++; h *= FNV_PRIME; }
    return h;
}

/* ---------------- printf-lite ---------------- */
struct out { char *buf; size_t cap, len; };
static void put(struct out *o, char c) { if (o->len + 1 < o->cap) o->buf[o->len] = c; o->len++; }

static void put_num(struct out *o, uint64_t v, unsigned base, int neg, int width, char pad) {
    char tmp[24]; int n = 0;
    do { unsigned d = v % base; tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10); v /= base; } while (v);
    if (neg) { if (pad == '0') { put(o, '-'); } else { tmp[n++] = '-'; } width--; }
    for (int i = n; i < width; i++) put(o, pad);
    while (n) put(o, tmp[--n]);
}

size_t lk_vformat(char *buf, size_t cap, const char *fmt, va_list ap) {
    struct out o = { buf, cap, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') { put(&o, *fmt); continue; }
        fmt++;
        char pad = ' '; int width = 0, lng = 0;
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { lng = 1; fmt++; }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            size_t n = strlen(s);
            for (size_t i = n; i < (size_t)width; i++) put(&o, ' ');
            while (*s) put(&o, *s++);
            break;
        }
        case 'c': put(&o, (char)va_arg(ap, int)); break;
        case 'd': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_num(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad);
            break;
        }
        case 'u': put_num(&o, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0, width, pad); break;
        case 'x': put_num(&o, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 0, width, pad); break;
        case 'p': put(&o, '0'); put(&o, 'x'); put_num(&o, (uint64_t)va_arg(ap, void *), 16, 0, width, pad); break;
        case '%': put(&o, '%'); break;
        case 0: fmt--; break;
        default: put(&o, '%'); put(&o, *fmt); break;
        }
    }
    if (cap) buf[o.len < cap ? o.len : cap - 1] = 0;
    return o.len < cap ? o.len : (cap ? cap - 1 : 0);
}

size_t lk_format(char *buf, size_t cap, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    size_t n = lk_vformat(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

void kprintf(const char *fmt, ...) {
    char buf[256]; va_list ap; va_start(ap, fmt);
    size_t n = lk_vformat(buf, sizeof buf, fmt, ap);
    va_end(ap);
    serial_write(buf, n);
}

void uprintf(const char *fmt, ...) {
    char buf[256]; va_list ap; va_start(ap, fmt);
    size_t n = lk_vformat(buf, sizeof buf, fmt, ap);
    va_end(ap);
    sys_write(buf, n);
}

/* ---------------- 16550 UART, COM1 ---------------- */
#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_DR 0x01
#define LSR_THRE 0x20

static volatile uint8_t rx_ring[256];
static volatile uint8_t rx_head, rx_tail;   /* head: written by IRQ, tail: by reader */

/* Move bytes from the UART FIFO into the ring, but only while the ring has room: bytes left
 * in the FIFO give the sender back-pressure instead of being dropped.
 * SAFETY: the 8259 is edge-triggered, so if the ring was full when IRQ4 ran, the UART line
 * stays high and no new IRQ comes; the reader must call this again (with IF=0) once it has
 * emptied the ring and before it sleeps, which drains the FIFO and re-arms the edge. */
void serial_rx_poll(void) {
    while ((uint8_t)(rx_head + 1) != rx_tail && (inb(COM1 + UART_LSR) & LSR_DR)) {
        rx_ring[rx_head] = inb(COM1 + UART_RBR);
        rx_head++;
    }
}

static void serial_rx_irq(struct lk_frame *f) { (void)f; serial_rx_poll(); }

void serial_init(int rx_irq) {
    outb(COM1 + UART_IER, 0);
    outb(COM1 + UART_LCR, 0x80);            /* DLAB */
    outb(COM1 + 0, 1);                      /* divisor 1: 115200 baud */
    outb(COM1 + 1, 0);
    outb(COM1 + UART_LCR, 0x03);            /* 8N1 */
    outb(COM1 + UART_FCR, 0x07);            /* FIFO on, clear both, RX trigger 1 byte */
    outb(COM1 + UART_MCR, 0x0B);            /* DTR | RTS | OUT2 (OUT2 gates the IRQ line) */
    if (rx_irq) {
        irq_set(4, serial_rx_irq);
        outb(COM1 + UART_IER, 0x01);        /* received-data-available interrupt */
        pic_unmask(4);
    }
}

int serial_rx_ready(void) { return rx_tail != rx_head; }

int serial_getc(void) {
    if (rx_tail == rx_head) return -1;
    uint8_t c = rx_ring[rx_tail];
    rx_tail++;
    return c;
}

static void tx(char c) {
    for (int spin = 0; spin < 1000000; spin++)      /* bounded: never hang on a dead UART */
        if (inb(COM1 + UART_LSR) & LSR_THRE) break;
    outb(COM1 + UART_THR, (uint8_t)c);
}

/* Lines end in a bare '\n' (no CR): the output is parsed by tools, not shown on a tty. */
void serial_putc(char c) { tx(c); }
void serial_write(const char *s, size_t n) { while (n--) serial_putc(*s++); }
void serial_puts(const char *s) { while (*s) serial_putc(*s++); }
