// Wakeable waits for the vCPU and pacer threads (eventfd + ppoll with nanosecond deadlines).
#ifndef CLOCKSTEP_WAIT_H
#define CLOCKSTEP_WAIT_H
#include <stdint.h>
int lk_eventfd(void);                         // fd or -errno
void lk_eventfd_signal(int fd);
// Waits until fd is signalled (drained) or CLOCK_MONOTONIC reaches deadline_ns (UINT64_MAX: no deadline).
// Returns 1 when signalled, 0 on deadline, -errno on error (EINTR is retried).
int lk_eventfd_wait(int fd, uint64_t deadline_ns);
int lk_set_timer_slack_ns(unsigned long ns);
// Routes a signal to an eventfd (returned, or -errno): the handler only signals it, whichever thread it lands on.
int lk_signal_eventfd(int signo);
// 1 when the process started with `signo` ignored (a shell's background job: SIGINT; nohup: SIGHUP), else 0.
int lk_signal_ignored(int signo);
// A descriptor that polls readable once process `pid` has ended (pidfd_open(2), Linux 5.3), or -errno.
int lk_pidfd_open(int pid);
// Asks for SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG), then checks the parent is still
// `expected_parent` (it may have died before the ask). 0, -ESRCH when it is gone already, or -errno.
int lk_die_with_parent(int expected_parent);
#endif
