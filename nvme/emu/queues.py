"""Queue state of the emulated controller: where each ring is and how far each side has got.

A submission queue is consumed by the controller from `head` up to the `tail` the host last
announced (doorbell or shadow doorbell). A completion queue is filled by the controller at `tail`
with the current `phase` tag (1 on the first pass, inverted on every wrap, Base 4.6) and freed by
the host up to `head`. It is full when advancing the tail would reach the head; completions that
find it full wait in `backlog` until the host frees entries.
"""
from collections import deque


class SubmissionQueue:
    __slots__ = ("qid", "base", "size", "cqid", "head", "tail", "prio", "fetched")

    def __init__(self, qid, base, size, cqid, prio=0):
        self.qid = qid
        self.base = base          # IOVA of entry 0 (physically contiguous: Create I/O SQ, Base 5.5)
        self.size = size          # entries
        self.cqid = cqid
        self.head = 0
        self.tail = 0
        self.prio = prio
        self.fetched = 0          # commands fetched over the queue's life

    @property
    def empty(self):
        return self.head == self.tail

    def __repr__(self):
        return (f"<SQ {self.qid} -> CQ {self.cqid} size {self.size} head {self.head} "
                f"tail {self.tail}>")


class CompletionQueue:
    __slots__ = ("qid", "base", "size", "head", "tail", "phase", "ien", "iv", "sqids",
                 "backlog", "posted")

    def __init__(self, qid, base, size, ien=False, iv=0):
        self.qid = qid
        self.base = base
        self.size = size
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.ien = ien
        self.iv = iv
        self.sqids = set()        # submission queues completing here
        self.backlog = deque()    # completions waiting for room: (cdw0, sqhd, sqid, cid, status)
        self.posted = 0

    @property
    def full(self):
        return (self.tail + 1) % self.size == self.head

    def advance(self):
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1

    def __repr__(self):
        return (f"<CQ {self.qid} size {self.size} head {self.head} tail {self.tail} "
                f"phase {self.phase} backlog {len(self.backlog)}>")
