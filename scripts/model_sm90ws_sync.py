"""A model of the synchronisation protocol of the warp-specialised forward (csrc/rfbias/sm90/fwd_ws_kernel.h), run
under many random interleavings: persistent CTAs walking several work items through one K/V ring and one or two query
buffers, mbarrier phases and parity waits, cp.async.mbarrier.arrive.noinc arrivals that come when copies land (in any
order), the second, plain arrival of fills with plain-store factor words, and the query tiles handed over either like
a fill or, when they are scaled in place, by one plain arrival after the producer waited for its copies. It fails on
a deadlock, on a consumer reading a slot or query buffer that does not hold its data, and on a copy landing in a slot
or buffer still being read. Keep it in step with the kernel when the protocol changes (the producer as one agent,
each consumer warpgroup as one agent).

    python scripts/model_sm90ws_sync.py
"""
import random


class MBar:
    def __init__(self, count): self.count = count; self.pending = count; self.ph = 0
    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0, "too many arrivals"
        if self.pending == 0: self.ph += 1; self.pending = self.count
    def done(self, parity): return (self.ph & 1) != parity


def run(items, n_blocks, S, C, Q, sync_factors, scale_q, seed):
    rnd = random.Random(seed)
    fill_arrivals = 2 if sync_factors else 1
    full = [MBar(fill_arrivals) for _ in range(S)]
    empty = [MBar(C) for _ in range(S)]  # one arrival per consumer (per warp in the kernel)
    qfull = [MBar(1 if scale_q else fill_arrivals) for _ in range(Q)]
    qempty = [MBar(C) for _ in range(Q)]
    slot_tile = [None] * S      # (item, tile) whose copies have landed in the slot
    qbuf = [None] * Q           # item whose query tiles have landed in the buffer
    inflight = []               # (kind, index, content, barrier): copies in flight; landing is the noinc arrival
    readers = {('s', i): set() for i in range(S)}
    readers.update({('q', i): set() for i in range(Q)})

    def land_some():
        if inflight and rnd.random() < 0.5:
            kind, idx, content, bar = inflight.pop(rnd.randrange(len(inflight)))
            assert not readers[(kind, idx)], f"copy {content} lands in {kind}{idx} while read by {readers[(kind, idx)]}"
            if kind == 's': slot_tile[idx] = content
            else: qbuf[idx] = content
            if bar is not None: bar.arrive()

    def producer():
        def arrive_fill(kind, idx, content, bar):
            inflight.append((kind, idx, content, bar))
            if sync_factors: bar.arrive()  # release arrive after the plain-store factor words
        t = 0
        for it in range(items):
            qb = it % Q
            if it >= Q: yield (lambda qb=qb, p=(it // Q - 1) & 1: qempty[qb].done(p))
            assert not readers[('q', qb)], f"producer writes query buffer {qb} while read"
            qbuf[qb] = None
            if scale_q:
                inflight.append(('q', qb, it, None))
                yield lambda: not inflight  # cp.async.wait_group 0: all of this thread's copies have landed
                qfull[qb].arrive()          # after the in-place scaling
            else:
                arrive_fill('q', qb, it, qfull[qb])
            for j in range(n_blocks):
                slot = t % S
                if t >= S: yield (lambda s=slot, p=((t // S) - 1) & 1: empty[s].done(p))
                assert not readers[('s', slot)], f"producer writes slot {slot} while read"
                slot_tile[slot] = None
                arrive_fill('s', slot, (it, j), full[slot])
                t += 1
                yield None

    def consumer(c):
        t = 0
        for it in range(items):
            qb = it % Q
            yield (lambda qb=qb, p=(it // Q) & 1: qfull[qb].done(p))
            assert qbuf[qb] == it, f"consumer {c} item {it}: query buffer {qb} holds {qbuf[qb]}"
            readers[('q', qb)].add(c)
            def use(j, tt):
                s = tt % S
                assert slot_tile[s] == (it, j), f"consumer {c} reads slot {s} expecting {(it, j)}, holds {slot_tile[s]}"
                readers[('s', s)].add(c)
            def release(tt):
                readers[('s', tt % S)].discard(c)
                empty[tt % S].arrive()
            yield (lambda tt=t: full[tt % S].done((tt // S) & 1))
            use(0, t)
            for j in range(n_blocks - 1):
                yield (lambda tt=t + j + 1: full[tt % S].done((tt // S) & 1))
                use(j + 1, t + j + 1)  # S(j + 1), then O += P(j) V(j)
                yield None             # softmax of S(j + 1)
                release(t + j)         # both products retired: slot j goes back
            yield None                 # the last PV product
            release(t + n_blocks - 1)  # the ring carries on into the next item
            readers[('q', qb)].discard(c)
            qempty[qb].arrive()
            t += n_blocks
            yield None                 # epilogue

    agents = {'P': producer()}
    for c in range(C): agents[f'C{c}'] = consumer(c)
    blocked = {k: None for k in agents}
    while agents:
        land_some()
        runnable = [k for k in agents if blocked[k] is None or blocked[k]()]
        if not runnable:
            if inflight: continue
            raise RuntimeError(f"deadlock: items={items} n={n_blocks} S={S} C={C} Q={Q} sync={sync_factors} "
                               f"scale={scale_q} blocked={list(agents)}")
        k = rnd.choice(runnable)
        try:
            blocked[k] = next(agents[k])
        except StopIteration:
            del agents[k]; del blocked[k]
    while inflight: land_some()


cases = 0
for items in [1, 2, 3, 5]:
    for n in [1, 2, 3, 4, 7]:
        for S in [2, 3, 4]:
            for C in [1, 2, 3]:
                for Q in [1, 2]:
                    for sync_factors in [False, True]:
                        for scale_q in [False, True]:
                            for seed in range(30):
                                run(items, n, S, C, Q, sync_factors, scale_q, seed); cases += 1
print("ok", cases)
