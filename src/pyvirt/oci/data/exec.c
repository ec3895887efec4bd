/* pyvirt-oci-exec: PID 1 of a container VM (images/data/init's sibling for `pyvirt run --oci`).
 *
 * /pyvirt-oci/init (busybox sh) mounts the image's disk on /oci and its /proc, /sys, /dev,
 * /tmp, then execs this program, which reads /pyvirt-oci/spec (records "K<value>\0":
 * A an argv word, E an environment entry, W the working directory, U the uid, G the gid,
 * S a supplementary gid, I stdio: "ports" | "tty" | "console"), starts the container's
 * main process (chroot /oci, mkdir -p and chdir to W, setgroups/setgid/setuid, execve with
 * PATH searched in the image), then stays PID 1: it reaps every child, forwards SIGINT,
 * SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH to the main process, and when that
 * exits syncs and powers the machine off through the syscon test finisher with its exit
 * status (a signal's death is 128 + the signal's number), which `pyvirt run` returns.
 * With I=tty the process gets a pseudo-terminal of the image's own devpts (/dev/pts/N in
 * the container, its controlling terminal in a new session) and PID 1 relays between its
 * master and the serial console (/dev/ttyS0, put in raw mode), as docker run -t does.
 * Each byte read from the port org.pyvirt.signal (when there is one: `pyvirt run` without -t)
 * is a signal number sent to the main process: the signals `pyvirt run` receives.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define MAX_SPEC (1 << 20)
#define MAX_ITEMS 4096
#define FINISHER 0x100000UL
#define PORTS "/dev/virtio-ports/org.pyvirt."

static char *argv_[MAX_ITEMS + 1], *envp_[MAX_ITEMS + 1];
static gid_t groups_[256];
static int nargs, nenv, ngroups;
static char *cwd = "/", *stdio_mode = "console";
static uid_t uid;
static int console_fd = -1, master_fd = -1;
static char slave_path[64];
static gid_t gid;

static void finish(int status)
{
    sync();
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd >= 0) {
        volatile uint32_t *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, FINISHER);
        if (p != MAP_FAILED)
            *p = status == 0 ? 0x5555 : ((uint32_t)status << 16) | 0x3333;
    }
    reboot(RB_POWER_OFF);
    _exit(status);
}

static void fail(const char *what)
{
    dprintf(2, "pyvirt-oci: %s: %s\n", what, strerror(errno));
    finish(125);
}

static void read_spec(void)
{
    static char buf[MAX_SPEC + 1];
    int fd = open("/pyvirt-oci/spec", O_RDONLY);
    if (fd < 0)
        fail("/pyvirt-oci/spec");
    ssize_t len = 0, n;
    while (len < MAX_SPEC && (n = read(fd, buf + len, MAX_SPEC - len)) > 0)
        len += n;
    close(fd);
    for (char *p = buf; p < buf + len; p += strlen(p) + 1) {
        char *v = p + 1;
        switch (*p) {
        case 'A': if (nargs < MAX_ITEMS) argv_[nargs++] = v; break;
        case 'E': if (nenv < MAX_ITEMS) envp_[nenv++] = v; break;
        case 'W': cwd = v; break;
        case 'U': uid = (uid_t)strtoul(v, NULL, 10); break;
        case 'G': gid = (gid_t)strtoul(v, NULL, 10); break;
        case 'S': if (ngroups < 256) groups_[ngroups++] = (gid_t)strtoul(v, NULL, 10); break;
        case 'I': stdio_mode = v; break;
        }
    }
    if (nargs == 0) {
        dprintf(2, "pyvirt-oci: no command to run\n");
        finish(125);
    }
}

static void mkdirs(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(path, 0755);
            *p = '/';
        }
    }
    mkdir(path, 0755);
}

static void open_pty(void)
{
    struct termios raw;
    struct winsize ws = {.ws_row = 24, .ws_col = 80};
    unsigned int n, unlock = 0;
    console_fd = open("/dev/ttyS0", O_RDWR | O_NOCTTY | O_CLOEXEC);
    master_fd = open("/oci/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (console_fd < 0 || master_fd < 0)
        fail("opening the terminal");
    if (ioctl(master_fd, TIOCSPTLCK, &unlock) < 0 || ioctl(master_fd, TIOCGPTN, &n) < 0)
        fail("the pseudo-terminal");
    snprintf(slave_path, sizeof slave_path, "/oci/dev/pts/%u", n);
    ioctl(master_fd, TIOCSWINSZ, &ws);
    if (tcgetattr(console_fd, &raw) == 0) {
        cfmakeraw(&raw);
        tcsetattr(console_fd, TCSANOW, &raw);
    }
}

/* Copy what `from` has to `to` (both may be non-blocking); -1 when `from` is done. */
static int relay(int from, int to)
{
    char buf[4096];
    ssize_t n = read(from, buf, sizeof buf);
    if (n <= 0)
        return n < 0 && errno == EAGAIN ? 0 : -1;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(to, buf + off, n - off);
        if (w < 0 && errno != EINTR && errno != EAGAIN)
            return 0;
        if (w > 0)
            off += w;
    }
    return 0;
}

static void exec_in_path(void)
{
    char *file = argv_[0];
    if (strchr(file, '/')) {
        execve(file, argv_, envp_);
    } else {
        const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        for (int i = 0; i < nenv; i++)
            if (strncmp(envp_[i], "PATH=", 5) == 0)
                path = envp_[i] + 5;
        int saw_eacces = 0;
        char full[4096];
        while (*path) {
            const char *end = strchrnul(path, ':');
            int n = snprintf(full, sizeof full, "%.*s/%s", (int)(end - path), path, file);
            if (n > 0 && n < (int)sizeof full) {
                execve(full, argv_, envp_);
                if (errno == EACCES)
                    saw_eacces = 1;
            }
            path = *end ? end + 1 : end;
        }
        errno = saw_eacces ? EACCES : ENOENT;
    }
    int code = errno == ENOENT ? 127 : 126;
    dprintf(2, "pyvirt-oci: cannot run %s: %s\n", file, strerror(errno));
    _exit(code);
}

static void child(void)
{
    if (strcmp(stdio_mode, "tty") == 0) {
        setsid();
        int fd = open(slave_path, O_RDWR);
        if (fd < 0 || ioctl(fd, TIOCSCTTY, 1) < 0)
            fail(slave_path);
        dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
        if (fd > 2) close(fd);
    } else if (strcmp(stdio_mode, "ports") == 0) {
        const char *names[3] = {PORTS "stdin", PORTS "stdout", PORTS "stderr"};
        for (int i = 0; i < 3; i++) {
            int fd = open(names[i], i == 0 ? O_RDONLY : O_WRONLY);
            if (fd < 0)
                fail(names[i]);
            dup2(fd, i);
            if (fd > 2) close(fd);
        }
    } else {
        int fd = open("/dev/null", O_RDONLY);
        if (fd >= 0) { dup2(fd, 0); if (fd > 2) close(fd); }
        setsid();
    }
    if (chroot("/oci") < 0 || chdir("/") < 0)
        fail("chroot /oci");
    if (cwd[0] == '/')
        mkdirs(cwd);
    if (chdir(cwd) < 0)
        fail(cwd);
    if (setgroups(ngroups, groups_) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
        fail("setting the user");
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    exec_in_path();
}

int main(void)
{
    static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    for (unsigned i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaddset(&set, forwarded[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    read_spec();
    if (strcmp(stdio_mode, "tty") == 0)
        open_pty();
    pid_t main_pid = fork();
    if (main_pid < 0)
        fail("fork");
    if (main_pid == 0)
        child();
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    int pfd = open(PORTS "signal", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (sfd < 0)
        fail("signalfd");
    for (;;) {
        struct pollfd fds[4] = {{.fd = sfd, .events = POLLIN}, {.fd = pfd, .events = POLLIN},
                                {.fd = console_fd, .events = POLLIN}, {.fd = master_fd, .events = POLLIN}};
        if (poll(fds, 4, -1) < 0)               /* (a negative fd is skipped) */
            continue;
        if (master_fd >= 0 && fds[3].revents && relay(master_fd, console_fd) < 0) {
            close(master_fd);                    /* every copy of the slave is closed */
            master_fd = -1;
        }
        if (master_fd >= 0 && fds[2].revents)
            relay(console_fd, master_fd);
        if (pfd >= 0 && fds[1].revents) {
            unsigned char sigs[64];
            ssize_t n = read(pfd, sigs, sizeof sigs);
            for (ssize_t i = 0; i < n; i++)
                if (sigs[i] >= 1 && sigs[i] < NSIG)
                    kill(main_pid, sigs[i]);
            if (n == 0 || (n < 0 && errno != EAGAIN) || (fds[1].revents & (POLLHUP | POLLERR))) {
                close(pfd);                        /* the host side went away */
                pfd = -1;
            }
        }
        if (!(fds[0].revents & POLLIN))
            continue;
        struct signalfd_siginfo info;
        if (read(sfd, &info, sizeof info) != sizeof info)
            continue;
        if (info.ssi_signo != SIGCHLD) {
            kill(main_pid, (int)info.ssi_signo);
            continue;
        }
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            if (pid == main_pid) {
                int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                kill(-1, SIGKILL);
                if (master_fd >= 0) {            /* what the process wrote last */
                    fcntl(master_fd, F_SETFL, O_NONBLOCK);
                    while (relay(master_fd, console_fd) == 0) {
                        struct pollfd m = {.fd = master_fd, .events = POLLIN};
                        if (poll(&m, 1, 100) <= 0)
                            break;
                    }
                }
                finish(code);
            }
        }
    }
}
