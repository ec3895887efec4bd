/* pyvirt-agent: the guest side of pyvirt's agent protocol (docs/agent.md), version 1
 * with the features named after the version in its greeting ("freeze": request Q).
 *
 * Listens on AF_VSOCK port 1024; each host connection is one request, served by a
 * forked child.  Frames both ways: le32 length, u8 type, `length` bytes of payload
 * (at most MAX_PAYLOAD; a longer frame ends the connection).
 *
 * Built static for riscv64 at image-build time (images/agent.py); started by the default
 * guest's /init and by the Debian image's pyvirt-agent.service.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <termios.h>
#include <unistd.h>

#define AGENT_PORT 1024
#define VERSION "pyvirt-agent 1 freeze"
#define MAX_PAYLOAD 65536
#define MAX_ARGS 256
#define MAX_FROZEN 64
#define THAW_AFTER_MS 30000       /* a freeze the host never ends is ended here */

static int conn = -1;

/* -- frames ------------------------------------------------------------------ */
static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int send_frame(int type, const void *data, size_t n) {
    unsigned char h[5] = {n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >> 24) & 0xff, (unsigned char)type};
    if (write_all(conn, h, 5) < 0) return -1;
    return n ? write_all(conn, data, n) : 0;
}

static int send_text(int type, const char *s) { return send_frame(type, s, strlen(s)); }

static int send_error(const char *what, const char *path) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s%s%s: %s", what, path ? " " : "", path ? path : "", strerror(errno));
    return send_text('X', msg);
}

/* Reads one frame: type, payload (NUL-terminated, room for MAX_PAYLOAD + 1); -1 at end or
 * on a frame too long. */
static int recv_frame(int *type, unsigned char *buf, uint32_t *len) {
    unsigned char h[5];
    if (read_all(conn, h, 5) < 0) return -1;
    uint32_t n = h[0] | h[1] << 8 | h[2] << 16 | (uint32_t)h[3] << 24;
    if (n > MAX_PAYLOAD) return -1;
    if (n && read_all(conn, buf, n) < 0) return -1;
    buf[n] = 0;
    *type = h[4];
    *len = n;
    return 0;
}

static uint32_t le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t le64(const unsigned char *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }
static void put32(unsigned char *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }

static unsigned char buf[MAX_PAYLOAD + 1];

/* -- exec ---------------------------------------------------------------------- */
/* One read of the command's output `*fd` to the host as a `type` frame; at its end the
 * descriptor is closed (unless it is also `keep`, a TTY's master) and set to -1.  A host
 * that went away hangs up on the command. */
static void pump(int *fd, int type, int keep, pid_t pid, int *conn_open) {
    static unsigned char obuf[16384];
    ssize_t r = read(*fd, obuf, sizeof obuf);
    if (r > 0) {
        fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) & ~O_NONBLOCK);
        int bad = send_frame(type, obuf, (size_t)r);
        fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) | O_NONBLOCK);
        if (bad) { kill(-pid, SIGHUP); *conn_open = 0; }
    } else if (r == 0 || errno != EAGAIN) {
        if (*fd != keep) close(*fd);
        *fd = -1;
    }
}

/* payload: u8 flags (1 tty, 2 stdin), le16 rows, le16 cols, then argv as NUL-terminated strings */
static int do_exec(const unsigned char *p, uint32_t n) {
    if (n < 6) return send_text('X', "exec: short request");
    int tty = p[0] & 1, want_stdin = p[0] & 2;
    struct winsize ws = {.ws_row = p[1] | p[2] << 8, .ws_col = p[3] | p[4] << 8};
    char *argv[MAX_ARGS + 1];
    int argc = 0;
    for (uint32_t i = 5; i < n && argc < MAX_ARGS;) {
        argv[argc++] = (char *)p + i;
        i += strnlen((char *)p + i, n - i) + 1;
    }
    argv[argc] = NULL;
    if (argc == 0 || p[n - 1] != 0) return send_text('X', "exec: no command");

    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
    if (tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) return send_error("exec: pty", NULL);
        ioctl(master, TIOCSWINSZ, &ws);
    } else if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        return send_error("exec: pipe", NULL);
    }
    pid_t pid = fork();
    if (pid < 0) return send_error("exec: fork", NULL);
    if (pid == 0) {
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        setsid();
        if (tty) {
            int slave = open(ptsname(master), O_RDWR);
            if (slave < 0) _exit(126);
            ioctl(slave, TIOCSCTTY, 0);
            dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
            if (slave > 2) close(slave);
        } else {
            int null = open("/dev/null", O_RDONLY);
            dup2(want_stdin ? in[0] : null, 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        if (!getenv("PATH")) setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
        if (tty && !getenv("TERM")) setenv("TERM", "xterm", 1);
        execvp(argv[0], argv);
        dprintf(2, "%s: %s\n", argv[0], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    int fd_in = tty ? master : in[1], fd_out = tty ? master : out[0], fd_err = tty ? -1 : err[0];
    if (!tty) {
        close(in[0]); close(out[1]); close(err[1]);
        if (!want_stdin) { close(in[1]); fd_in = -1; }
    }
    fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) | O_NONBLOCK);
    if (fd_in >= 0) fcntl(fd_in, F_SETFL, fcntl(fd_in, F_GETFL) | O_NONBLOCK);

    /* the host's frames are parsed from `inq`; stdin bytes wait in `pend` */
    static unsigned char inq[MAX_PAYLOAD + 5];
    static unsigned char pend[MAX_PAYLOAD];
    size_t inq_n = 0, pend_n = 0, pend_off = 0;
    int conn_open = 1, stdin_eof = 0;
    while (fd_out >= 0 || fd_err >= 0) {
        /* the host's complete frames first (they may all be here already) */
        while (inq_n >= 5 && pend_n == 0) {
            uint32_t len = le32(inq);
            if (len > MAX_PAYLOAD) { conn_open = 0; kill(-pid, SIGKILL); break; }
            if (inq_n < 5 + len) break;
            int type = inq[4];
            unsigned char *pl = inq + 5;
            if (type == 'I') {
                if (len == 0) {
                    stdin_eof = 1;
                    if (tty) { unsigned char eot = 4; memcpy(pend, &eot, 1); pend_off = 0; pend_n = 1; }
                    else if (fd_in >= 0) { close(fd_in); fd_in = -1; }
                } else if (fd_in >= 0) {
                    memcpy(pend, pl, len); pend_off = 0; pend_n = len;
                }
            } else if (type == 'W' && len == 4 && tty) {
                struct winsize w2 = {.ws_row = pl[0] | pl[1] << 8, .ws_col = pl[2] | pl[3] << 8};
                ioctl(master, TIOCSWINSZ, &w2);
            } else if (type == 'K' && len == 1) {
                kill(-pid, pl[0]);
            }
            memmove(inq, inq + 5 + len, inq_n - 5 - len);
            inq_n -= 5 + len;
        }
        struct pollfd fds[4];
        int nf = 0, i_conn = -1, i_in = -1, i_out = -1, i_err = -1;
        if (conn_open && pend_n == 0 && inq_n < sizeof inq) { i_conn = nf; fds[nf++] = (struct pollfd){conn, POLLIN, 0}; }
        if (fd_in >= 0 && pend_n) { i_in = nf; fds[nf++] = (struct pollfd){fd_in, POLLOUT, 0}; }
        if (fd_out >= 0) { i_out = nf; fds[nf++] = (struct pollfd){fd_out, POLLIN, 0}; }
        if (fd_err >= 0) { i_err = nf; fds[nf++] = (struct pollfd){fd_err, POLLIN, 0}; }
        if (poll(fds, nf, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (i_out >= 0 && fds[i_out].revents) pump(&fd_out, '1', fd_in, pid, &conn_open);
        if (i_err >= 0 && fds[i_err].revents) pump(&fd_err, '2', -1, pid, &conn_open);
        if (i_in >= 0 && fds[i_in].revents) {
            ssize_t w = write(fd_in, pend + pend_off, pend_n);
            if (w > 0) { pend_off += (size_t)w; pend_n -= (size_t)w; }
            else if (w < 0 && errno != EAGAIN) { pend_n = 0; }
            if (pend_n == 0 && stdin_eof && !tty && fd_in >= 0) { close(fd_in); fd_in = -1; }
        }
        if (i_conn >= 0 && fds[i_conn].revents) {
            ssize_t r = read(conn, inq + inq_n, sizeof inq - inq_n);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                conn_open = 0;                      /* the host went away: hang up on the command */
                kill(-pid, SIGHUP);
                continue;
            }
            if (r > 0) inq_n += (size_t)r;
        }
    }
    if (fd_in >= 0 && fd_in != fd_out) close(fd_in);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) & ~O_NONBLOCK);
    unsigned char x[5];
    if (WIFSIGNALED(status)) { put32(x, 0); x[4] = (unsigned char)WTERMSIG(status); }
    else { put32(x, (uint32_t)WEXITSTATUS(status)); x[4] = 0; }
    return send_frame('x', x, 5);
}

/* -- files ----------------------------------------------------------------------- */
static int do_read_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) return send_error("cannot open", path);
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        if (!S_ISREG(st.st_mode)) errno = EISDIR;
        send_error("not a regular file:", path);
        close(fd);
        return -1;
    }
    unsigned char meta[12];
    put32(meta, st.st_mode & 07777);
    put32(meta + 4, (uint32_t)st.st_size);
    put32(meta + 8, (uint32_t)((uint64_t)st.st_size >> 32));
    if (send_frame('M', meta, 12) < 0) return -1;
    for (;;) {
        ssize_t r = read(fd, buf, MAX_PAYLOAD);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { send_error("read", path); close(fd); return -1; }
        if (r == 0) break;
        if (send_frame('D', buf, (size_t)r) < 0) { close(fd); return -1; }
    }
    close(fd);
    return send_frame('Z', NULL, 0);
}

/* payload: le32 mode, path.  Then 'D' frames and 'Z'.  Written to a temporary file beside
 * the target and renamed over it at the end; removed on any error. */
static int do_write_file(const unsigned char *p, uint32_t n) {
    if (n < 5) return send_text('X', "put: short request");
    mode_t mode = le32(p) & 07777;
    const char *path = (const char *)p + 4;
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.pyvirt-tmp-%d", path, (int)getpid()) >= (int)sizeof tmp) {
        errno = ENAMETOOLONG;
        return send_error("cannot create", path);
    }
    char target[PATH_MAX];
    snprintf(target, sizeof target, "%s", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return send_error("cannot create", target);
    int type;
    uint32_t len;
    for (;;) {
        if (recv_frame(&type, buf, &len) < 0) { close(fd); unlink(tmp); return -1; }
        if (type == 'Z') break;
        if (type != 'D' || write_all(fd, buf, len) < 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            errno = type != 'D' ? EPROTO : e;
            /* keep reading to the end so that the host sees the error, not a reset */
            while (type == 'D' && recv_frame(&type, buf, &len) == 0 && type == 'D') {}
            errno = type != 'D' && type != 'Z' ? EPROTO : e;
            return send_error("cannot write", target);
        }
    }
    if (fchmod(fd, mode) < 0 || fsync(fd) < 0 || close(fd) < 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return send_error("cannot write", target);
    }
    if (rename(tmp, target) < 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return send_error("cannot rename onto", target);
    }
    return send_frame('Z', NULL, 0);
}

/* -- the rest ------------------------------------------------------------------ */
static void list_ports(const char *file, char *out, size_t cap, size_t *used) {
    FILE *f = fopen(file, "r");
    char line[512];
    if (!f) return;
    if (!fgets(line, sizeof line, f)) { fclose(f); return; }
    while (fgets(line, sizeof line, f)) {
        char local[128];
        unsigned st;
        if (sscanf(line, "%*d: %127s %*s %x", local, &st) != 2 || st != 0x0A) continue;   /* LISTEN */
        char *colon = strrchr(local, ':');
        if (!colon) continue;
        unsigned port = (unsigned)strtoul(colon + 1, NULL, 16);
        int w = snprintf(out + *used, cap - *used, "%u\n", port);
        if (w < 0 || (size_t)w >= cap - *used) break;
        *used += (size_t)w;
    }
    fclose(f);
}

static int set_mac(const char *arg) {
    char ifname[IFNAMSIZ + 1];
    unsigned m[6];
    if (sscanf(arg, "%16s %x:%x:%x:%x:%x:%x", ifname, &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 7) {
        errno = EINVAL;
        return -1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    for (int i = 0; i < 6; i++) ifr.ifr_hwaddr.sa_data[i] = (char)m[i];
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct ifreq up = ifr;
    int was_up = ioctl(s, SIOCGIFFLAGS, &up) == 0 && (up.ifr_flags & IFF_UP);
    if (was_up) { up.ifr_flags &= ~IFF_UP; ioctl(s, SIOCSIFFLAGS, &up); }
    int rc = ioctl(s, SIOCSIFHWADDR, &ifr);
    int e = errno;
    if (was_up) { up.ifr_flags |= IFF_UP; ioctl(s, SIOCSIFFLAGS, &up); }
    close(s);
    errno = e;
    return rc;
}

static int freeze(const char *path, unsigned long req) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ioctl(fd, req, 0);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* -- freezing every file system for a snapshot (request Q) ---------------------------- */
/* /proc/mounts writes ' ', tab, newline and backslash in octal (\040) */
static void unescape(char *s) {
    char *o = s;
    for (char *p = s; *p; o++) {
        if (p[0] == '\\' && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' && p[3] >= '0' && p[3] <= '7') {
            *o = (char)((p[1] - '0') << 6 | (p[2] - '0') << 3 | (p[3] - '0'));
            p += 4;
        } else {
            *o = *p++;
        }
    }
    *o = 0;
}

/* Whether a mounted file system is one to freeze: block-backed (its source a /dev node),
 * mounted read-write, not a kind that has no blocks of its own or that the host serves. */
static int freezable(const char *src, const char *type, const char *opts) {
    static const char *skip[] = {"tmpfs", "ramfs", "proc", "sysfs", "devtmpfs", "devpts", "virtiofs", "9p",
                                 "overlay", "squashfs", "iso9660", "nfs", "nfs4", "cifs", "cgroup", "cgroup2",
                                 "debugfs", "tracefs", "securityfs", "pstore", "bpf", "mqueue", "hugetlbfs",
                                 "configfs", "fusectl", "autofs", "rootfs", "efivarfs", NULL};
    if (strncmp(src, "/dev/", 5) != 0 || strncmp(type, "fuse", 4) == 0) return 0;
    if (strncmp(opts, "rw", 2) != 0 || (opts[2] && opts[2] != ',')) return 0;
    for (int i = 0; skip[i]; i++)
        if (strcmp(type, skip[i]) == 0) return 0;
    return 1;
}

static char frozen[MAX_FROZEN][PATH_MAX];
static int n_frozen;

/* Thaws what this request froze, newest first; the mount points thawed go to `out`. */
static void thaw_all(char *out, size_t cap) {
    size_t used = 0;
    if (cap) out[0] = 0;
    while (n_frozen > 0) {
        const char *m = frozen[--n_frozen];
        if (freeze(m, FITHAW) == 0 && used < cap) {
            int w = snprintf(out + used, cap - used, "%s\n", m);
            if (w > 0) used += (size_t)w < cap - used ? (size_t)w : cap - used - 1;
        }
    }
}

/* Q: FIFREEZE each writable block-backed file system (the last mounted first; one per
 * device), answer 'T' with their mount points one a line (none: nothing to freeze), then
 * wait for the host's 'U' -- or its going away, or THAW_AFTER_MS -- and thaw them all
 * ('Z' with the mount points thawed; 'X' when it was not the host that ended it).  A file
 * system without freeze support is left as it is; an error thaws what was frozen. */
static int do_freeze_all(void) {
    static char lines[256][PATH_MAX + 64];
    int n = 0;
    FILE *f = fopen("/proc/mounts", "r");
    if (!f) return send_error("cannot read", "/proc/mounts");
    char line[3 * PATH_MAX];
    while (n < 256 && fgets(line, sizeof line, f)) snprintf(lines[n++], sizeof lines[0], "%s", line);
    fclose(f);
    dev_t devs[MAX_FROZEN];
    static char out[MAX_PAYLOAD];
    size_t used = 0;
    n_frozen = 0;
    for (int i = n - 1; i >= 0; i--) {
        char src[PATH_MAX], dir[PATH_MAX], type[64], opts[1024];
        if (sscanf(lines[i], "%4095s %4095s %63s %1023s", src, dir, type, opts) != 4) continue;
        unescape(dir);
        if (!freezable(src, type, opts)) continue;
        struct stat st;
        if (stat(dir, &st) < 0) continue;
        int seen = 0;
        for (int k = 0; k < n_frozen; k++) seen |= devs[k] == st.st_dev;
        if (seen) continue;                                       /* a bind mount of one frozen */
        if (n_frozen == MAX_FROZEN) break;
        if (freeze(dir, FIFREEZE) < 0) {
            if (errno == EOPNOTSUPP || errno == ENOTTY || errno == EINVAL || errno == EBUSY) continue;
            int e = errno;
            thaw_all(out, sizeof out);
            errno = e;
            return send_error("freeze", dir);
        }
        devs[n_frozen] = st.st_dev;
        snprintf(frozen[n_frozen++], PATH_MAX, "%s", dir);
        int w = snprintf(out + used, sizeof out - used, "%s\n", dir);
        if (w > 0 && (size_t)w < sizeof out - used) used += (size_t)w;
    }
    if (send_frame('T', out, used) < 0) { thaw_all(out, sizeof out); return -1; }
    /* the file systems stay frozen until the host says 'U' */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int type = 0, host = 0;
    uint32_t len;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = THAW_AFTER_MS - ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000);
        if (left <= 0) break;
        struct pollfd pf = {conn, POLLIN, 0};
        int r = poll(&pf, 1, (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        host = recv_frame(&type, buf, &len) == 0 && type == 'U';
        break;                                    /* 'U', anything else or the host gone */
    }
    thaw_all(out, sizeof out);
    if (!host) return send_text('X', "freeze: thawed without the host's word (it went away or took over 30 s)");
    return send_frame('Z', out, strlen(out));
}

/* payload: le16 port.  Connects to 127.0.0.1:port in the guest, answers 'Z', then the
 * connection carries the TCP stream's bytes both ways (no more frames). */
static int do_tcp(const unsigned char *p, uint32_t n) {
    if (n != 2) return send_text('X', "tcp: bad request");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(p[0] | p[1] << 8)),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (t < 0 || connect(t, (struct sockaddr *)&a, sizeof a) < 0) return send_error("tcp: connect", NULL);
    if (send_frame('Z', NULL, 0) < 0) return -1;
    int open_[2] = {1, 1};
    int fds[2] = {conn, t};
    while (open_[0] || open_[1]) {
        struct pollfd pf[2];
        int idx[2], nf = 0;
        for (int i = 0; i < 2; i++)
            if (open_[i]) { idx[nf] = i; pf[nf++] = (struct pollfd){fds[i], POLLIN, 0}; }
        if (poll(pf, nf, -1) < 0) { if (errno == EINTR) continue; break; }
        for (int k = 0; k < nf; k++) {
            if (!pf[k].revents) continue;
            int i = idx[k];
            ssize_t r = read(fds[i], buf, MAX_PAYLOAD);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0 || write_all(fds[1 - i], buf, (size_t)r) < 0) {
                open_[i] = 0;
                shutdown(fds[1 - i], SHUT_WR);
            }
        }
    }
    close(t);
    return 0;
}

static void serve(void) {
    int type;
    uint32_t n;
    if (send_text('V', VERSION) < 0 || recv_frame(&type, buf, &n) < 0) return;
    const char *arg = (const char *)buf;
    switch (type) {
    case 'E': do_exec(buf, n); break;
    case 'R': do_read_file(arg); break;
    case 'P': do_write_file(buf, n); break;
    case 'N': do_tcp(buf, n); break;
    case 'L': {
        static char out[MAX_PAYLOAD];
        size_t used = 0;
        list_ports("/proc/net/tcp", out, sizeof out, &used);
        list_ports("/proc/net/tcp6", out, sizeof out, &used);
        send_frame('T', out, used);
        break;
    }
    case 'C': {
        if (n != 12) { send_text('X', "clock: bad request"); break; }
        struct timeval tv = {.tv_sec = (time_t)le64(buf), .tv_usec = (suseconds_t)(le32(buf + 8) / 1000)};
        if (settimeofday(&tv, NULL) < 0) send_error("settimeofday", NULL);
        else send_frame('Z', NULL, 0);
        break;
    }
    case 'H':
        if (n == 0 || n > 64 || sethostname(arg, n) < 0) { if (n == 0 || n > 64) errno = EINVAL; send_error("sethostname", arg); }
        else send_frame('Z', NULL, 0);
        break;
    case 'A':
        if (set_mac(arg) < 0) send_error("set MAC", arg);
        else send_frame('Z', NULL, 0);
        break;
    case 'F': case 'U':
        if (freeze(n ? arg : "/", type == 'F' ? FIFREEZE : FITHAW) < 0) send_error(type == 'F' ? "freeze" : "thaw", n ? arg : "/");
        else send_frame('Z', NULL, 0);
        break;
    case 'Q': do_freeze_all(); break;
    case 'O':
        send_frame('Z', NULL, 0);
        sync();
        reboot(RB_POWER_OFF);
        break;
    default: send_text('X', "unknown request"); break;
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);                 /* the per-connection children are not waited for */
    int s = -1;
    for (int tries = 0; s < 0; tries++) {
        s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = AGENT_PORT};
        if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 && listen(s, 64) == 0) break;
        if (s >= 0) close(s);
        s = -1;
        if (tries > 50) { perror("pyvirt-agent: vsock"); return 1; }
        sleep(1);                              /* the driver may not be up yet */
    }
    for (;;) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN) continue;
            sleep(1);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(s);
            signal(SIGCHLD, SIG_DFL);
            conn = c;
            serve();
            _exit(0);
        }
        close(c);
    }
}
