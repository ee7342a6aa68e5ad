/*
 * nsm-cni: the fast path of the NSM CNI plugin.
 *
 * A container runtime starts the plugin for every ADD, DEL and CHECK of every pod; a CPython
 * process takes ~15 ms just to start, more than the bridge plugin's whole ADD. This program does
 * what the hot path needs and nothing else: it hands the command (the CNI_* environment and
 * stdin, as they are) to the node agent (`nsm cni-agent`) over its unix socket, prints the
 * agent's answer and exits with the agent's status. The agent does all the checks and work
 * (nsm/cni/agent.py, `Agent.shim`), exactly as for the Python plugin (nsm/cni/plugin.py).
 *
 * Everything else is the Python plugin's, run in place of this one (execv, stdin replayed from
 * a memfd, the same environment): VERSION, STATUS and GC; an agent that does not listen (the
 * plugin waits for it, and DEL succeeds without it); an agent that says "fallback" (e.g. the
 * config names another socket); stdin too large; and an exchange that failed half way
 * (NSM_CNI_SHIM_FAILED tells the plugin which way, so that it answers as it would have, without
 * asking the agent again). The plugin is `<this executable>-python`.
 *
 * Wire (one exchange per connection, see nsm/cni/spec.py): this program sends one line
 *   {"shim":1,"env":"<base64 of NUL-separated CNI_*=value>","stdin":"<base64>"}
 * and the agent answers "<exit status>\n<what to print>" then closes, or "fallback\n".
 *
 * The socket: the config's top-level "socket" string when it is plain (no escapes), else the
 * default. A wrong guess is harmless: the agent compares the config's socket, as it parses it,
 * with its own and answers "fallback" when they differ.
 *
 * libc only; built by `./dev setup` and the image (`cc -O2 -static`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/nsm/cni/agent.sock"
/* spec.MAX_MESSAGE: the longest line either side sends. */
#define MAX_MESSAGE (4 * 1024 * 1024)
/* The most stdin that fits that line in base64 beside the environment; more goes to the
 * plugin, which sends it as JSON and gets the agent's refusal of a message too long. */
#define MAX_STDIN (MAX_MESSAGE / 4 * 3 - 256 * 1024)
/* A little over the plugin's default answer timeout (spec.DEFAULT_TIMEOUT, 120 s): the agent
 * applies the config's own timeout and answers; this only guards against a wedged agent. */
#define ANSWER_TIMEOUT_MS (125 * 1000)

extern char **environ;

static char *input;
static size_t input_len;
/* How the runtime ran this program (argv[0]): where the Python plugin is when /proc is not. */
static const char *invoked = "nsm-cni";

/* Run the Python plugin in place of this process, stdin replayed; `failed` (or NULL) tells it
 * how the exchange with the agent failed. Never returns. */
static void fallback(const char *failed) {
    char self[PATH_MAX - 8];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    char plugin[PATH_MAX];
    if (n > 0) {
        self[n] = '\0';
        snprintf(plugin, sizeof plugin, "%s-python", self);
    } else {
        snprintf(plugin, sizeof plugin, "%s-python", invoked);
    }
    int fd = memfd_create("nsm-cni-stdin", 0);
    if (fd >= 0) {
        size_t off = 0;
        while (off < input_len) {
            ssize_t w = write(fd, input + off, input_len - off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) break;
            off += (size_t)w;
        }
        if (off == input_len && lseek(fd, 0, SEEK_SET) == 0 && dup2(fd, 0) == 0) close(fd);
    }
    if (failed != NULL) setenv("NSM_CNI_SHIM_FAILED", failed, 1);
    char *argv[] = {plugin, NULL};
    execv(plugin, argv);
    fprintf(stderr, "nsm-cni: cannot run %s: %s\n", plugin, strerror(errno));
    exit(1);
}

static void read_stdin(void) {
    size_t cap = 64 * 1024;
    input = malloc(cap);
    if (input == NULL) fallback(NULL);
    for (;;) {
        if (input_len == cap) {
            if (cap >= MAX_STDIN) fallback(NULL); /* the plugin reports it */
            cap *= 2;
            char *grown = realloc(input, cap);
            if (grown == NULL) fallback(NULL);
            input = grown;
        }
        ssize_t r = read(0, input + input_len, cap - input_len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fallback(NULL);
        if (r == 0) {
            if (input_len > MAX_STDIN) fallback(NULL);
            return;
        }
        input_len += (size_t)r;
    }
}

/* --- the socket named by the config ---------------------------------------------------- */

static size_t skip_ws(const char *s, size_t i, size_t n) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

/* Past the string starting at s[i] == '"'; *plain: it has no escape. n on error. */
static size_t skip_string(const char *s, size_t i, size_t n, int *plain) {
    *plain = 1;
    for (i++; i < n; i++) {
        if (s[i] == '\\') {
            *plain = 0;
            i++;
        } else if (s[i] == '"') {
            return i + 1;
        }
    }
    return n;
}

/* Past the JSON value starting at s[i]; n on error. */
static size_t skip_value(const char *s, size_t i, size_t n) {
    int plain, depth = 0;
    while (i < n) {
        char c = s[i];
        if (c == '"') {
            i = skip_string(s, i, n, &plain);
        } else if (c == '{' || c == '[') {
            depth++;
            i++;
        } else if (c == '}' || c == ']') {
            if (depth == 0) return i;
            depth--;
            i++;
        } else if (c == ',' && depth == 0) {
            return i;
        } else {
            i++;
        }
        if (depth == 0 && i < n && (s[i] == ',' || s[i] == '}' || s[i] == ']')) return i;
    }
    return n;
}

/* The config's top-level "socket" if it is a plain string that fits a socket address. */
static int config_socket(char *out, size_t size) {
    const char *s = input;
    size_t n = input_len, i = skip_ws(s, 0, n);
    int plain;
    if (i >= n || s[i] != '{') return 0;
    i++;
    for (;;) {
        i = skip_ws(s, i, n);
        if (i >= n || s[i] != '"') return 0;
        size_t key = i + 1, end = skip_string(s, i, n, &plain);
        if (end >= n) return 0;
        int is_socket = plain && end - key - 1 == 6 && memcmp(s + key, "socket", 6) == 0;
        i = skip_ws(s, end, n);
        if (i >= n || s[i] != ':') return 0;
        i = skip_ws(s, i + 1, n);
        if (i >= n) return 0;
        if (is_socket) {
            if (s[i] != '"') return 0;
            size_t val = i + 1, vend = skip_string(s, i, n, &plain);
            size_t len = vend - val - 1;
            if (vend >= n || !plain || len == 0 || len >= size) return 0;
            memcpy(out, s + val, len);
            out[len] = '\0';
            return 1;
        }
        i = skip_ws(s, skip_value(s, i, n), n);
        if (i >= n || s[i] != ',') return 0;
        i++;
    }
}

/* --- the message ------------------------------------------------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64(char *out, const unsigned char *in, size_t n) {
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        *out++ = B64[in[i] >> 2];
        *out++ = B64[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
        *out++ = B64[((in[i + 1] & 15) << 2) | (in[i + 2] >> 6)];
        *out++ = B64[in[i + 2] & 63];
    }
    if (i < n) {
        *out++ = B64[in[i] >> 2];
        if (i + 1 < n) {
            *out++ = B64[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
            *out++ = B64[(in[i + 1] & 15) << 2];
        } else {
            *out++ = B64[(in[i] & 3) << 4];
            *out++ = '=';
        }
        *out++ = '=';
    }
    return out;
}

static char *message(size_t *len) {
    size_t env_len = 0;
    for (char **e = environ; *e != NULL; e++)
        if (strncmp(*e, "CNI_", 4) == 0) env_len += strlen(*e) + 1;
    char *env = malloc(env_len + 1), *p = env;
    if (env == NULL) return NULL;
    for (char **e = environ; *e != NULL; e++)
        if (strncmp(*e, "CNI_", 4) == 0) {
            size_t l = strlen(*e) + 1;
            memcpy(p, *e, l); /* with its NUL: the separator */
            p += l;
        }
    static const char head[] = "{\"shim\":1,\"env\":\"", mid[] = "\",\"stdin\":\"", tail[] = "\"}\n";
    size_t cap = sizeof head + sizeof mid + sizeof tail + 4 * (env_len / 3 + 1) + 4 * (input_len / 3 + 1);
    char *out = malloc(cap), *q = out;
    if (out == NULL) return NULL;
    memcpy(q, head, sizeof head - 1);
    q = b64(q + sizeof head - 1, (const unsigned char *)env, env_len);
    memcpy(q, mid, sizeof mid - 1);
    q = b64(q + sizeof mid - 1, (const unsigned char *)input, input_len);
    memcpy(q, tail, sizeof tail - 1);
    q += sizeof tail - 1;
    free(env);
    *len = (size_t)(q - out);
    return out;
}

/* --- the exchange ------------------------------------------------------------------------ */

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 0 && argv[0] != NULL && argv[0][0] != '\0') invoked = argv[0];
    const char *command = getenv("CNI_COMMAND");
    read_stdin();
    if (command == NULL || (strcmp(command, "ADD") != 0 && strcmp(command, "DEL") != 0 &&
                            strcmp(command, "CHECK") != 0))
        fallback(NULL);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!config_socket(addr.sun_path, sizeof addr.sun_path))
        strcpy(addr.sun_path, DEFAULT_SOCKET);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        fallback(NULL); /* not listening: the plugin waits for it, or DEL goes on without it */

    size_t len;
    char *msg = message(&len);
    if (msg == NULL) fallback(NULL);
    if (send_all(fd, msg, len) != 0) fallback(NULL); /* it read nothing: ask it again */
    free(msg);

    size_t cap = 64 * 1024, got = 0;
    char *answer = malloc(cap);
    if (answer == NULL) fallback("closed");
    long deadline = now_ms() + ANSWER_TIMEOUT_MS;
    for (;;) {
        long left = deadline - now_ms();
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (left <= 0) fallback("timeout");
        int ready = poll(&pfd, 1, (int)left);
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) fallback("timeout");
        if (got == cap) {
            if (cap >= 2 * MAX_MESSAGE) fallback("closed");
            cap *= 2;
            char *grown = realloc(answer, cap);
            if (grown == NULL) fallback("closed");
            answer = grown;
        }
        ssize_t r = recv(fd, answer + got, cap - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fallback("closed");
        if (r == 0) break;
        got += (size_t)r;
    }
    close(fd);

    char *nl = memchr(answer, '\n', got);
    if (nl == NULL) fallback("closed");
    *nl = '\0';
    if (strcmp(answer, "fallback") == 0) fallback(NULL);
    char *end;
    long status = strtol(answer, &end, 10);
    if (end == answer || *end != '\0' || status < 0 || status > 255) fallback("closed");
    size_t out_len = got - (size_t)(nl + 1 - answer);
    if (out_len > 0 && fwrite(nl + 1, 1, out_len, stdout) != out_len) return 1;
    if (fflush(stdout) != 0) return 1;
    return (int)status;
}
