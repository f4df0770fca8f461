#define _GNU_SOURCE
#include "CLockstep.h"
#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int lk_eventfd(void) {
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

void lk_eventfd_signal(int fd) {
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r; // EAGAIN means the counter is already non-zero: the waiter will wake anyway.
}

int lk_eventfd_wait(int fd, uint64_t deadline_ns) {
    for (;;) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r;
        if (deadline_ns == UINT64_MAX) {
            r = ppoll(&p, 1, NULL, NULL);
        } else {
            uint64_t now = lk_monotonic_ns();
            if (now >= deadline_ns) return 0;
            uint64_t d = deadline_ns - now;
            struct timespec ts = { .tv_sec = (time_t)(d / 1000000000ull), .tv_nsec = (long)(d % 1000000000ull) };
            r = ppoll(&p, 1, &ts, NULL);
        }
        if (r < 0) { if (errno == EINTR) continue; return -errno; }
        if (r == 0) continue; // re-check the deadline against the clock
        uint64_t v;
        ssize_t n = read(fd, &v, sizeof v);
        (void)n;
        return 1;
    }
}

int lk_set_timer_slack_ns(unsigned long ns) { return prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0) < 0 ? -errno : 0; }
