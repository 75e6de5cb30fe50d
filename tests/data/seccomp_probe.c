/* Tries the syscalls pyrio's RuntimeDefault seccomp profile must refuse, and
 * a few it must allow, printing one "name=ok" or "name=E<errno>" line each.
 * Built with gcc -static by tests/test_seccomp.py and run inside a container. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/netlink.h>

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif

static void report(const char *name, long result) {
    if (result < 0)
        printf("%s=E%d\n", name, errno);
    else
        printf("%s=ok\n", name);
}

/* A child made by a raw clone/clone3 exits at once; the parent reaps it. */
static long reap(long pid) {
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, __WALL);
    return pid;
}

static long try_socket(long family, long type, long protocol) {
    long fd = syscall(SYS_socket, family, type, protocol);
    if (fd >= 0)
        close((int)fd);
    return fd;
}

int main(void) {
    struct { uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls; } args;
    unsigned char params[120];
    long fd;

    report("clone_newuser", reap(syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)));
    report("clone_plain", reap(syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0)));
    report("unshare_newuser", syscall(SYS_unshare, CLONE_NEWUSER));
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    report("clone3", reap(syscall(SYS_clone3, &args, sizeof args)));
    memset(params, 0, sizeof params);
    fd = syscall(SYS_io_uring_setup, 4, params);
    report("io_uring_setup", fd);
    if (fd >= 0)
        close((int)fd);
    report("netlink_netfilter", try_socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER));
    /* The kernel reads socket()'s arguments as ints: high bits must not slip past the filter. */
    report("netlink_netfilter_high_bits", try_socket((1L << 32) | AF_NETLINK, SOCK_RAW, (1L << 32) | NETLINK_NETFILTER));
    report("netlink_route", try_socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE));
    report("inet_stream", try_socket(AF_INET, SOCK_STREAM, 0));
    report("unix_dgram", try_socket(AF_UNIX, SOCK_DGRAM, 0));
    return 0;
}
