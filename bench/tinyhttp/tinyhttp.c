/* A tiny single-threaded epoll HTTP/1.1 server for benchmarks: answers every request
 * (no body expected) with "ok\n", keeps connections alive. Listens on $PORT (8080). */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXEV 256
#define BUF 16384

static const char RESP[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n";

struct conn { int fd; size_t len; char buf[BUF]; };

static void handle(int ep, struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, BUF - c->len);
        if (n == 0 || (n < 0 && errno != EAGAIN)) { epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); free(c); return; }
        if (n < 0) return;
        c->len += (size_t)n;
        char *start = c->buf, *end;
        while ((end = memmem(start, c->len - (size_t)(start - c->buf), "\r\n\r\n", 4)) != NULL) {
            if (write(c->fd, RESP, sizeof RESP - 1) < 0) break;
            start = end + 4;
        }
        c->len -= (size_t)(start - c->buf);
        memmove(c->buf, start, c->len);
        if (c->len == BUF) c->len = 0;
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, _exit);
    const char *p = getenv("PORT");
    int port = p ? atoi(p) : 8080, one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[MAXEV];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLET, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
            } else handle(ep, evs[i].data.ptr);
        }
    }
}
