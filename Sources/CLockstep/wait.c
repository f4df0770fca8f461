#define _GNU_SOURCE
#include "CLockstep.h"
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
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

// One eventfd per signal number that lk_signal_eventfd routed (a handler may only write(2)).
static int signal_fds[65];

static void signal_to_eventfd(int signo) {
    int saved = errno;
    if (signo > 0 && signo < 65 && signal_fds[signo] > 0) lk_eventfd_signal(signal_fds[signo]);
    errno = saved;
}

int lk_signal_eventfd(int signo) {
    if (signo <= 0 || signo >= 65) return -EINVAL;
    int fd = lk_eventfd();
    if (fd < 0) return fd;
    signal_fds[signo] = fd;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = signal_to_eventfd;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART; // whichever thread takes it, its blocking calls go on
    if (sigaction(signo, &sa, NULL) < 0) { int e = errno; close(fd); signal_fds[signo] = 0; return -e; }
    // A parent (a test runner, a thread pool) may have left it blocked: this thread, and those it starts, take it.
    lk_unblock_signal(signo);
    return fd;
}

int lk_signal_ignored(int signo) {
    struct sigaction old;
    if (sigaction(signo, NULL, &old) < 0) return 0;
    return old.sa_handler == SIG_IGN;
}

int lk_pidfd_open(int pid) {
    long fd = syscall(SYS_pidfd_open, pid, 0);  // no glibc wrapper before 2.36
    return fd < 0 ? -errno : (int)fd;
}

int lk_die_with_parent(int expected_parent) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) return -errno;  // variadic: not callable from Swift
    return getppid() == expected_parent ? 0 : -ESRCH;
}
