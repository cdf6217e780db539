/*
 * bencher-agent: PID 1 of the benchmark microVM.
 *
 * Build: gcc -static -Os -Wall -Wextra -Werror -o bencher-agent guest/agent.c
 *
 * Mounts the image's root disk, switches root into it, runs the job's command once with its
 * stdout/stderr piped, and writes everything the host needs as records on the output disk; then
 * reboots, which ends QEMU (-no-reboot). PID 1 must never exit: every failure ends in fail().
 * Diagnostics go to /dev/console as "bencher-agent: ..." lines.
 *
 * JOB CONFIG (/bencher/job in the initramfs; host encoder: bencher_runner/sandbox/agentconfig.py)
 *   A sequence of NUL-terminated "KEY=VALUE\0" entries, split at the FIRST '='. First entry
 *   "version=1". Keys: arg (repeated, in order, >= 1: argv; argv[0] searched in the job's PATH
 *   if it has no '/'), env (repeated "NAME=VALUE": the command's complete environment), cwd
 *   (absolute), uid, gid (decimal), groups (comma-separated decimal gids, may be empty),
 *   max_output (decimal bytes: cap for stdout, for stderr and for each output file), output
 *   (repeated, optional: files to collect after exit, relative to cwd), net_addr (optional,
 *   "A.B.C.D/PREFIX": configure eth0 with it), net_gw (default route via this IPv4 address),
 *   net_dns (the nameserver written to /etc/resolv.conf).
 *
 * OUTPUT DISK (host decoder: bencher_runner/sandbox/outputdisk.py). All integers little-endian.
 *   Header block (host-written, 4096 bytes): "BRUNOUT1", u32 version = 1, zeros. The output disk
 *   is the vd* disk starting with these 8 bytes; the root disk (ext4) is the other one.
 *   Records from offset 4096, back to back, no padding:
 *     16-byte header: magic "BRR1", u16 type, u16 flags (0), u32 length, u32 crc32 (zlib) of payload
 *     payload of `length` bytes.
 *   The host stops at DONE or at the first record with a bad magic/length/crc or past the disk end.
 *     1 HELLO         u64 boottime_ns (CLOCK_BOOTTIME at agent start) + version string
 *     2 STDOUT        chunk of stdout (<= 64 KiB)
 *     3 STDERR        chunk of stderr (<= 64 KiB)
 *     4 EXIT          i32 exit_code, i32 term_signal, u64 start_ns, u64 end_ns,
 *                     u64 stdout_total, u64 stderr_total (including bytes dropped over the cap)
 *     5 FILE          u32 path_len, path, u64 size_total, content (<= max_output bytes)
 *     6 FILE_MISSING  i32 errno, path (EISDIR for a directory, EINVAL for other non-regular files)
 *     7 ERROR         message: the agent could not do its job; followed by DONE
 *     8 DONE          empty; last record, followed by fdatasync
 *   Records are written whole with one pwrite, except FILE, whose content is streamed first and
 *   whose header is written last (so a large file never sits in memory and a torn one is invalid).
 *   The last RESERVE bytes of the disk are kept for ERROR + DONE; data that does not fit is dropped
 *   (counted and logged).
 *
 * After the command exits, its pipes are drained until both are at EOF, 200 ms pass without data, or
 * 2 s have passed (a background process may hold them open); then every other process is killed
 * before the output files are read.
 *
 * Exit codes the agent itself produces in the child: 126 if setting ids fails, if chdir(cwd) fails
 * with anything but ENOENT, or exec fails with anything but ENOENT/ENOTDIR; 127 for those. A command
 * killed by signal N is reported as 128+N with term_signal N.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/fs.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "bencher-agent 1"
#define JOB_PATH "/bencher/job"
#define MODULES_DIR "/bencher/modules"
#define NEWROOT "/newroot"
#define HEADER_SIZE 4096
#define REC_HEADER 16
#define CHUNK (64 * 1024)
#define RESERVE 1024 /* kept free for the final ERROR + DONE */
#define MS 1000000ULL

enum { HELLO = 1, STDOUT_REC, STDERR_REC, EXIT_REC, FILE_REC, FILE_MISSING, ERROR_REC, DONE };

struct job {
	char **argv, **envp, **outputs;
	size_t argc, envc, noutputs, ngroups;
	const char *cwd;
	gid_t *groups;
	uid_t uid;
	gid_t gid;
	uint64_t max_output;
	int have_uid, have_gid, have_max;
	const char *net_addr, *net_gw, *net_dns;
};

static int log_fd = 2;
static int out_fd = -1;
static uint64_t out_off = HEADER_SIZE, out_size, out_dropped;
static int out_dirty;
static uint32_t crc_table[256];
static unsigned char rec[REC_HEADER + CHUNK + 2 * PATH_MAX]; /* one record, header + payload */
static char errbuf[1024];

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static __attribute__((format(printf, 1, 2))) void logmsg(const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	dprintf(log_fd, "bencher-agent: %s\n", line); /* if the console fails there is nowhere to tell */
}

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320U ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

/* zlib-compatible crc32: start with crc = 0, feed pieces in order */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
	return ~crc;
}

static unsigned char *put_le(unsigned char *p, uint64_t v, int bytes)
{
	for (int i = 0; i < bytes; i++)
		*p++ = (unsigned char)(v >> (8 * i));
	return p;
}

static int pwrite_all(const void *buf, size_t n, uint64_t off)
{
	const char *p = buf;
	while (n) {
		ssize_t w = pwrite(out_fd, p, n, (off_t)off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w, n -= (size_t)w, off += (uint64_t)w;
	}
	return 0;
}

static void sync_output(void)
{
	if (out_fd >= 0 && fdatasync(out_fd) < 0)
		logmsg("fdatasync output disk: %s", strerror(errno));
	out_dirty = 0;
}

/* Payload bytes that fit at the current offset; -1 if not even a record header does. */
static int64_t room(int type)
{
	uint64_t limit = type == ERROR_REC || type == DONE ? out_size : out_size - RESERVE;
	if (out_size < HEADER_SIZE + RESERVE || out_off + REC_HEADER > limit)
		return -1;
	return (int64_t)(limit - out_off - REC_HEADER);
}

static void put_header(unsigned char *h, int type, uint32_t len, uint32_t crc)
{
	memcpy(h, "BRR1", 4);
	put_le(put_le(put_le(put_le(h + 4, (uint64_t)type, 2), 0, 2), len, 4), crc, 4);
}

/* One record of `a` followed by `b` (b may be truncated to fit the buffer or the disk). */
static void write_record(int type, const void *a, size_t alen, const void *b, size_t blen)
{
	if (out_fd < 0)
		return;
	size_t max_b = sizeof rec - REC_HEADER - alen;
	size_t total = alen + (blen < max_b ? blen : max_b);
	int64_t space = room(type);
	size_t fits = space < 0 ? 0 : (uint64_t)space < total ? (size_t)space : total;
	int can_split = type == STDOUT_REC || type == STDERR_REC; /* the rest of a chunk is dropped */
	if (space < 0 || (fits < total && (!can_split || fits == 0))) {
		out_dropped += total;
		return;
	}
	out_dropped += total - fits;
	memcpy(rec + REC_HEADER, a, alen);
	memcpy(rec + REC_HEADER + alen, b, fits - alen);
	put_header(rec, type, (uint32_t)fits, crc32_update(0, rec + REC_HEADER, fits));
	if (pwrite_all(rec, REC_HEADER + fits, out_off) < 0) {
		logmsg("write output disk at %llu: %s", (unsigned long long)out_off, strerror(errno));
		out_fd = -1; /* the disk is unusable: stop writing, the host sees a torn tail */
		return;
	}
	out_off += REC_HEADER + fits;
	out_dirty = 1;
}

static __attribute__((noreturn)) void finish(void)
{
	write_record(DONE, "", 0, "", 0);
	sync_output();
	if (out_dropped)
		logmsg("output disk full: dropped %llu bytes", (unsigned long long)out_dropped);
	sync();
	reboot(RB_AUTOBOOT);
	logmsg("reboot: %s", strerror(errno));
	for (;;)
		pause();
}

static __attribute__((noreturn, format(printf, 1, 2))) void fail(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	logmsg("%s", msg);
	write_record(ERROR_REC, msg, strlen(msg), "", 0);
	finish();
}

static int mkdir_ok(const char *path, mode_t mode)
{
	return mkdir(path, mode) == 0 || errno == EEXIST ? 0 : -1;
}

static void mount_or_fail(const char *src, const char *dst, const char *type, const char *data)
{
	if (mount(src, dst, type, 0, data) < 0)
		fail("mount %s on %s: %s", src, dst, strerror(errno));
}

/* ---- job config ------------------------------------------------------------------------- */

static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (max - (uint64_t)(*s - '0')) / 10)
			return -1;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return 0;
}

static const char *parse_groups(struct job *j, char *s)
{
	size_t n = *s ? 1 : 0;
	for (char *p = s; *p; p++)
		n += *p == ',';
	j->groups = calloc(n + 1, sizeof *j->groups);
	if (!j->groups)
		return "out of memory";
	for (char *tok = strtok(s, ","); n && tok; tok = strtok(NULL, ",")) {
		uint64_t g;
		if (parse_u64(tok, 0xFFFFFFFEU, &g) < 0)
			return "job config: invalid group id in groups";
		j->groups[j->ngroups++] = (gid_t)g;
	}
	return j->ngroups == n ? NULL : "job config: empty group id in groups";
}

/* Parses the job config; returns NULL or an error message. */
static const char *read_job(struct job *j)
{
	int fd = open(JOB_PATH, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(errbuf, sizeof errbuf, "open %s: %s", JOB_PATH, strerror(errno));
		return errbuf;
	}
	size_t len = (size_t)st.st_size, got = 0;
	char *buf = malloc(len + 1);
	if (!buf)
		return "job config: out of memory";
	while (got < len) {
		ssize_t r = read(fd, buf + got, len - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			snprintf(errbuf, sizeof errbuf, "read %s: %s", JOB_PATH, r ? strerror(errno) : "short");
			return errbuf;
		}
		got += (size_t)r;
	}
	close(fd);
	if (len == 0 || buf[len - 1] != '\0')
		return "job config is empty or its last entry is not NUL-terminated";
	size_t entries = 0;
	for (size_t i = 0; i < len; i++)
		entries += buf[i] == '\0';
	j->argv = calloc(entries + 1, sizeof(char *));
	j->envp = calloc(entries + 1, sizeof(char *));
	j->outputs = calloc(entries + 1, sizeof(char *));
	if (!j->argv || !j->envp || !j->outputs)
		return "job config: out of memory";

	for (char *p = buf, *next, *end = buf + len; p < end; p = next) {
		char *key = p, *val = strchr(p, '=');
		uint64_t n;
		next = p + strlen(p) + 1;
		if (!val) {
			snprintf(errbuf, sizeof errbuf, "job config: entry \"%.60s\" has no '='", key);
			return errbuf;
		}
		*val++ = '\0';
		if (p == buf) {
			if (strcmp(key, "version") || strcmp(val, "1"))
				return "job config: first entry is not version=1 (agent and runner versions differ)";
		} else if (!strcmp(key, "arg")) {
			j->argv[j->argc++] = val;
		} else if (!strcmp(key, "env")) {
			if (val[0] == '=' || !strchr(val, '='))
				return "job config: env entry is not NAME=VALUE";
			j->envp[j->envc++] = val;
		} else if (!strcmp(key, "cwd")) {
			if (val[0] != '/')
				return "job config: cwd is not absolute";
			j->cwd = val;
		} else if (!strcmp(key, "uid") || !strcmp(key, "gid")) {
			if (parse_u64(val, 0xFFFFFFFEU, &n) < 0)
				return "job config: invalid uid or gid";
			if (key[0] == 'u')
				j->uid = (uid_t)n, j->have_uid = 1;
			else
				j->gid = (gid_t)n, j->have_gid = 1;
		} else if (!strcmp(key, "groups")) {
			const char *err = parse_groups(j, val);
			if (err)
				return err;
		} else if (!strcmp(key, "max_output")) {
			if (parse_u64(val, UINT64_MAX, &j->max_output) < 0)
				return "job config: invalid max_output";
			j->have_max = 1;
		} else if (!strcmp(key, "net_addr")) {
			j->net_addr = val;
		} else if (!strcmp(key, "net_gw")) {
			j->net_gw = val;
		} else if (!strcmp(key, "net_dns")) {
			j->net_dns = val;
		} else if (!strcmp(key, "output")) {
			if (strlen(val) >= PATH_MAX)
				return "job config: output path too long";
			j->outputs[j->noutputs++] = val;
		} else {
			snprintf(errbuf, sizeof errbuf, "job config: unknown key \"%.60s\"", key);
			return errbuf;
		}
	}
	if (!j->argc || !j->cwd || !j->have_uid || !j->have_gid || !j->have_max)
		return "job config: arg, cwd, uid, gid and max_output are required";
	return NULL;
}

/* ---- boot: modules, disks, root --------------------------------------------------------- */

static int by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

static int is_module(const struct dirent *d)
{
	size_t n = strlen(d->d_name);
	return n > 3 && !strcmp(d->d_name + n - 3, ".ko");
}

static void load_modules(void)
{
	struct dirent **names;
	int n = scandir(MODULES_DIR, &names, is_module, by_name);
	if (n < 0) {
		if (errno != ENOENT) /* no directory: a kernel with every driver built in (the lean one) */
			logmsg("scandir %s: %s", MODULES_DIR, strerror(errno));
		return;
	}
	for (int i = 0; i < n; i++) {
		char path[PATH_MAX];
		snprintf(path, sizeof path, "%s/%s", MODULES_DIR, names[i]->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
			logmsg("load module %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		free(names[i]);
	}
	free(names);
}

static int by_string(const void *a, const void *b)
{
	return strcmp(a, b);
}

/* Sorted vd* names in /sys/block (up to max); returns the count. */
static int list_vd(char names[][32], int max)
{
	DIR *d = opendir("/sys/block");
	struct dirent *e;
	int n = 0;
	if (!d)
		fail("opendir /sys/block: %s", strerror(errno));
	while ((e = readdir(d)) && n < max)
		if (!strncmp(e->d_name, "vd", 2) && strlen(e->d_name) < 32)
			strcpy(names[n++], e->d_name);
	closedir(d);
	qsort(names, (size_t)n, sizeof names[0], by_string);
	return n;
}

/* Makes /dev/NAME from /sys/block/NAME/dev if devtmpfs has not yet; opens it. */
static int open_disk(const char *name, int flags)
{
	char path[64], num[32] = {0};
	unsigned maj, min;
	snprintf(path, sizeof path, "/sys/block/%s/dev", name);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read(fd, num, sizeof num - 1) <= 0 || sscanf(num, "%u:%u", &maj, &min) != 2)
		fail("read %s: %s", path, strerror(errno));
	close(fd);
	snprintf(path, sizeof path, "/dev/%s", name);
	if (mknod(path, S_IFBLK | 0600, makedev(maj, min)) < 0 && errno != EEXIST)
		fail("mknod %s: %s", path, strerror(errno));
	fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		fail("open %s: %s", path, strerror(errno));
	return fd;
}

/* Waits for the two virtio disks; opens the output disk, returns the root disk's name. */
static const char *find_disks(char *out_name)
{
	static char names[8][32];
	int n = 0;
	for (int tries = 0; tries < 1000 && (n = list_vd(names, 8)) < 2; tries++)
		usleep(10000);
	if (n < 2)
		fail("found %d virtio disks after 10 s, expected 2 (root and output)", n);
	const char *root = NULL;
	for (int i = 0; i < n; i++) {
		char magic[8];
		int fd = open_disk(names[i], O_RDONLY);
		ssize_t r = pread(fd, magic, sizeof magic, 0);
		close(fd);
		if (r == 8 && !memcmp(magic, "BRUNOUT1", 8) && out_fd < 0) {
			out_fd = open_disk(names[i], O_RDWR);
			strcpy(out_name, names[i]);
		} else if (!root) {
			root = names[i];
		}
	}
	if (out_fd < 0 || !root)
		fail("no output disk (magic BRUNOUT1) or no root disk among %d virtio disks", n);
	if (ioctl(out_fd, BLKGETSIZE64, &out_size) < 0) {
		int err = errno;
		out_fd = -1;
		fail("BLKGETSIZE64 on /dev/%s: %s", out_name, strerror(err));
	}
	return root;
}

static void enter_root(const char *root, const char *out_name)
{
	static const char *const dirs[] = {"/proc", "/sys", "/dev", "/run", "/tmp"};
	char path[PATH_MAX];
	snprintf(path, sizeof path, "/dev/%s", root);
	if (mkdir_ok(NEWROOT, 0755) < 0)
		fail("mkdir %s: %s", NEWROOT, strerror(errno));
	mount_or_fail(path, NEWROOT, "ext4", NULL);
	for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
		snprintf(path, sizeof path, NEWROOT "%s", dirs[i]);
		if (mkdir(path, 0755) == 0) {
			if (!strcmp(dirs[i], "/tmp") && chmod(path, 01777) < 0)
				fail("chmod %s: %s", path, strerror(errno));
		} else if (errno != EEXIST) {
			fail("mkdir %s: %s", path, strerror(errno));
		}
	}
	mount_or_fail("proc", NEWROOT "/proc", "proc", NULL);
	mount_or_fail("sysfs", NEWROOT "/sys", "sysfs", NULL);
	mount_or_fail("devtmpfs", NEWROOT "/dev", "devtmpfs", NULL);
	if (mkdir_ok(NEWROOT "/dev/pts", 0755) < 0 || mkdir_ok(NEWROOT "/dev/shm", 0755) < 0)
		fail("mkdir in %s/dev: %s", NEWROOT, strerror(errno));
	mount_or_fail("devpts", NEWROOT "/dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620");
	mount_or_fail("tmpfs", NEWROOT "/dev/shm", "tmpfs", "mode=1777");
	mount_or_fail("tmpfs", NEWROOT "/run", "tmpfs", "mode=755");
	if (chdir(NEWROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
		fail("switch root to %s: %s", NEWROOT, strerror(errno));
	snprintf(path, sizeof path, "/dev/%s", out_name);
	if (unlink(path) < 0 && errno != ENOENT)
		fail("unlink %s: %s", path, strerror(errno));
}

static void loopback_up(void)
{
	struct ifreq ifr = {0};
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	strcpy(ifr.ifr_name, "lo");
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		fail("get flags of lo: %s", strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		fail("bring up lo: %s", strerror(errno));
	close(s);
}

/* eth0 from the job's net_* keys: address/prefix, default route, resolv.conf. */
static void network_up(const struct job *j)
{
	struct ifreq ifr = {0};
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	char addr[32];
	unsigned prefix;
	const char *slash = strchr(j->net_addr, '/');
	if (!slash || (size_t)(slash - j->net_addr) >= sizeof addr || sscanf(slash + 1, "%u", &prefix) != 1 ||
	    prefix > 32)
		fail("job config: net_addr \"%s\" is not A.B.C.D/PREFIX", j->net_addr);
	memcpy(addr, j->net_addr, (size_t)(slash - j->net_addr));
	addr[slash - j->net_addr] = '\0';
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		fail("socket: %s", strerror(errno));
	strcpy(ifr.ifr_name, "eth0");
	for (int i = 0; ioctl(s, SIOCGIFFLAGS, &ifr) < 0; i++) { /* virtio_net probes asynchronously */
		if (i == 500)
			fail("network requested but eth0 did not appear: %s", strerror(errno));
		usleep(10000);
	}
	sin->sin_family = AF_INET;
	if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1 || ioctl(s, SIOCSIFADDR, &ifr) < 0)
		fail("set eth0 address %s: %s", addr, strerror(errno));
	sin->sin_addr.s_addr = prefix ? htonl(0xFFFFFFFFu << (32 - prefix)) : 0;
	if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0)
		fail("set eth0 netmask /%u: %s", prefix, strerror(errno));
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		fail("get flags of eth0: %s", strerror(errno));
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		fail("bring up eth0: %s", strerror(errno));
	if (j->net_gw) {
		struct rtentry rt = {0};
		struct sockaddr_in *gw = (struct sockaddr_in *)&rt.rt_gateway;
		((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
		((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
		gw->sin_family = AF_INET;
		if (inet_pton(AF_INET, j->net_gw, &gw->sin_addr) != 1)
			fail("job config: net_gw \"%s\" is not an IPv4 address", j->net_gw);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = (char *)"eth0";
		if (ioctl(s, SIOCADDRT, &rt) < 0)
			fail("add default route via %s: %s", j->net_gw, strerror(errno));
	}
	close(s);
	if (j->net_dns) {
		/* The image's resolv.conf may be a dangling symlink (systemd-resolved): replace it. */
		if (mkdir_ok("/etc", 0755) < 0 || (unlink("/etc/resolv.conf") < 0 && errno != ENOENT))
			fail("replace /etc/resolv.conf: %s", strerror(errno));
		int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd < 0 || dprintf(fd, "nameserver %s\n", j->net_dns) < 0 || close(fd) < 0)
			fail("write /etc/resolv.conf: %s", strerror(errno));
	}
}

/* ---- the command ------------------------------------------------------------------------ */

static __attribute__((noreturn)) void child_fail(int code, const char *what, const char *arg)
{
	dprintf(2, "bencher-agent: %s \"%s\": %s\n", what, arg, strerror(errno));
	_exit(code);
}

static __attribute__((noreturn)) void run_child(const struct job *j, int out_w, int err_w)
{
	sigset_t none;
	sigemptyset(&none);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and glibc's internal ones */
	sigprocmask(SIG_SETMASK, &none, NULL);
	int null = open("/dev/null", O_RDONLY);
	if (dup2(err_w, 2) < 0 || dup2(out_w, 1) < 0)
		_exit(126);
	if (setsid() < 0 || null < 0 || dup2(null, 0) < 0)
		child_fail(126, "set up stdin", "/dev/null");
	if (null > 2)
		close(null);
	if (setgroups(j->ngroups, j->groups) < 0 || setgid(j->gid) < 0 || setuid(j->uid) < 0) {
		dprintf(2, "bencher-agent: set uid %u gid %u: %s\n", j->uid, j->gid, strerror(errno));
		_exit(126);
	}
	if (chdir(j->cwd) < 0)
		child_fail(errno == ENOENT ? 127 : 126, "chdir", j->cwd);
	environ = j->envp;
	execvp(j->argv[0], j->argv);
	child_fail(errno == ENOENT || errno == ENOTDIR ? 127 : 126, "exec", j->argv[0]);
}

struct stream {
	int fd, type;
	uint64_t total, kept;
};

static void pump(struct stream *s, uint64_t max_output)
{
	static unsigned char buf[CHUNK];
	ssize_t r = read(s->fd, buf, sizeof buf);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r < 0)
		fail("read command output: %s", strerror(errno));
	if (r == 0) {
		close(s->fd);
		s->fd = -1;
		return;
	}
	s->total += (uint64_t)r;
	uint64_t keep = s->kept < max_output ? max_output - s->kept : 0;
	if (keep > (uint64_t)r)
		keep = (uint64_t)r;
	if (keep) {
		write_record(s->type, "", 0, buf, (size_t)keep);
		s->kept += keep;
	}
}

static void run_command(const struct job *j)
{
	int outp[2], errp[2], status = 0;
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &chld, NULL) < 0)
		fail("block SIGCHLD: %s", strerror(errno));
	int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0 || pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 ||
	    fcntl(outp[0], F_SETFL, O_NONBLOCK) < 0 || fcntl(errp[0], F_SETFL, O_NONBLOCK) < 0)
		fail("set up command pipes: %s", strerror(errno));

	uint64_t start = now_ns();
	pid_t pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0)
		run_child(j, outp[1], errp[1]);
	close(outp[1]);
	close(errp[1]);

	struct stream streams[2] = {{outp[0], STDOUT_REC, 0, 0}, {errp[0], STDERR_REC, 0, 0}};
	uint64_t end = 0, last_data = start, last_sync = start;
	int exited = 0;
	while (streams[0].fd >= 0 || streams[1].fd >= 0) {
		uint64_t now = now_ns();
		int timeout = -1;
		if (exited) { /* drain until 200 ms of quiet (at most 2 s): a background process may hold the pipes */
			uint64_t quiet = now - (last_data > end ? last_data : end);
			if (quiet >= 200 * MS || now - end >= 2000 * MS)
				break;
			timeout = (int)((200 * MS - quiet) / MS) + 1;
		}
		if (out_dirty) {
			int until_sync = now - last_sync >= 250 * MS ? 0 : (int)((250 * MS - (now - last_sync)) / MS) + 1;
			timeout = timeout < 0 || until_sync < timeout ? until_sync : timeout;
		}
		struct pollfd fds[3] = {
			{streams[0].fd, POLLIN, 0}, {streams[1].fd, POLLIN, 0}, {exited ? -1 : sfd, POLLIN, 0}};
		if (poll(fds, 3, timeout) < 0 && errno != EINTR)
			fail("poll: %s", strerror(errno));
		for (int i = 0; i < 2; i++)
			if (streams[i].fd >= 0 && fds[i].revents) {
				pump(&streams[i], j->max_output);
				last_data = now_ns();
			}
		if (fds[2].revents) {
			struct signalfd_siginfo info;
			while (read(sfd, &info, sizeof info) > 0) {
			}
			int st;
			pid_t w;
			while ((w = waitpid(-1, &st, WNOHANG)) > 0)
				if (w == pid)
					status = st, exited = 1, end = now_ns();
		}
		if (out_dirty && now_ns() - last_sync >= 250 * MS) {
			sync_output();
			last_sync = now_ns();
		}
	}
	for (int i = 0; i < 2; i++)
		if (streams[i].fd >= 0)
			close(streams[i].fd);
	while (!exited) { /* pipes closed before the child exited */
		int st;
		pid_t w = waitpid(-1, &st, 0);
		if (w < 0 && errno != EINTR)
			fail("waitpid: %s", strerror(errno));
		if (w == pid)
			status = st, exited = 1, end = now_ns();
	}
	close(sfd);
	int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
	int code = sig ? 128 + sig : WEXITSTATUS(status);
	unsigned char exit_rec[40], *p = exit_rec;
	p = put_le(p, (uint32_t)code, 4);
	p = put_le(p, (uint32_t)sig, 4);
	p = put_le(p, start, 8);
	p = put_le(p, end, 8);
	p = put_le(p, streams[0].total, 8);
	put_le(p, streams[1].total, 8);
	write_record(EXIT_REC, exit_rec, sizeof exit_rec, "", 0);
	sync_output();
}

/* ---- output files ----------------------------------------------------------------------- */

static void file_missing(const char *path, int err)
{
	unsigned char head[4];
	put_le(head, (uint32_t)err, 4);
	write_record(FILE_MISSING, head, sizeof head, path, strlen(path));
}

/* FILE: the content is streamed to the disk first, the header written last, all in place. */
static void collect_file(const char *cwd, const char *path, uint64_t max_output)
{
	char full[PATH_MAX];
	struct stat st;
	if (path[0] != '/' && snprintf(full, sizeof full, "%s/%s", cwd, path) >= (int)sizeof full)
		return file_missing(path, ENAMETOOLONG);
	/* O_NONBLOCK: opening a FIFO must not hang the agent */
	int fd = open(path[0] == '/' ? path : full, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0)
		return file_missing(path, errno);
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return file_missing(path, S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
	}
	size_t path_len = strlen(path), head_len = 4 + path_len + 8;
	unsigned char *head = rec + REC_HEADER;
	put_le(put_le(head, path_len, 4) + path_len, (uint64_t)st.st_size, 8);
	memcpy(head + 4, path, path_len);
	int64_t space = room(FILE_REC);
	if (space < (int64_t)head_len) {
		out_dropped += head_len + (uint64_t)st.st_size;
		close(fd);
		return;
	}
	uint32_t crc = crc32_update(0, head, head_len);
	uint64_t off = out_off + REC_HEADER + head_len, got = 0;
	uint64_t cap = (uint64_t)space - head_len < max_output ? (uint64_t)space - head_len : max_output;
	static unsigned char buf[CHUNK];
	while (got < cap) {
		ssize_t r = read(fd, buf, cap - got < sizeof buf ? cap - got : sizeof buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			int err = errno;
			close(fd);
			return file_missing(path, err);
		}
		if (r == 0)
			break;
		if (pwrite_all(buf, (size_t)r, off + got) < 0)
			fail("write output disk: %s", strerror(errno));
		crc = crc32_update(crc, buf, (size_t)r);
		got += (uint64_t)r;
	}
	close(fd);
	if (got < max_output && got < (uint64_t)st.st_size)
		out_dropped += (uint64_t)st.st_size - got;
	put_header(rec, FILE_REC, (uint32_t)(head_len + got), crc);
	if (pwrite_all(rec, REC_HEADER + head_len, out_off) < 0)
		fail("write output disk: %s", strerror(errno));
	out_off += REC_HEADER + head_len + got;
	out_dirty = 1;
}

/* ---- main ------------------------------------------------------------------------------- */

int main(void)
{
	uint64_t hello_ns = now_ns();
	static struct job job;
	char out_name[32];
	crc_init();
	mkdir_ok("/dev", 0755), mkdir_ok("/proc", 0555), mkdir_ok("/sys", 0555);
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) < 0 && errno != EBUSY)
		logmsg("mount devtmpfs on /dev: %s", strerror(errno));
	int console = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (console >= 0)
		log_fd = console;
	for (int fd = 0; fd < 3; fd++) /* so no pipe or disk ever lands on 0..2 (the child's dup2s) */
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
			logmsg("open /dev/null as fd %d: %s", fd, strerror(errno));
	mount_or_fail("proc", "/proc", "proc", NULL);
	mount_or_fail("sysfs", "/sys", "sysfs", NULL);

	const char *job_error = read_job(&job);
	load_modules();
	const char *root = find_disks(out_name);
	unsigned char hello[8];
	put_le(hello, hello_ns, 8);
	write_record(HELLO, hello, sizeof hello, AGENT_VERSION, strlen(AGENT_VERSION));
	if (job_error)
		fail("%s", job_error);

	enter_root(root, out_name);
	loopback_up();
	if (job.net_addr)
		network_up(&job);
	run_command(&job);
	kill(-1, SIGKILL); /* stop leftover background processes before reading their files */
	for (size_t i = 0; i < job.noutputs; i++)
		collect_file(job.cwd, job.outputs[i], job.max_output);
	finish();
}
