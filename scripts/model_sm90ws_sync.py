"""A model of the synchronisation protocol of the warp-specialised forward (csrc/rfbias/sm90/fwd_ws_kernel.h), run
under many random interleavings: mbarrier phases and parity waits, cp.async.mbarrier.arrive.noinc arrivals that come
when copies land (in any order), the second, plain arrival of fills with plain-store factor words, and the query
tile handed over either like a fill or, when it is scaled in place, by one plain arrival. It fails on a deadlock, on a
consumer reading a slot that does not hold its tile, and on a copy landing in a slot still being read. Keep it in
step with the kernel when the protocol changes (the producer as one agent, each consumer warpgroup as one agent).

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


def run(n_blocks, S, C, sync_factors, scale_q, seed):
    rnd = random.Random(seed)
    fill_arrivals = 2 if sync_factors else 1
    full = [MBar(fill_arrivals) for _ in range(S)]
    empty = [MBar(C) for _ in range(S)]  # one arrival per consumer (per warp in the kernel)
    query = MBar(1 if scale_q else fill_arrivals)
    slot_tile = [None] * S      # tile id whose copies have landed in the slot
    inflight = []               # (slot, tile, barrier): copies in flight; landing is the noinc arrival
    readers = [set() for _ in range(S)]

    def land_some():
        if inflight and rnd.random() < 0.5:
            slot, tile, bar = inflight.pop(rnd.randrange(len(inflight)))
            if slot is not None:
                assert not readers[slot], f"copy of tile {tile} lands in slot {slot} while read by {readers[slot]}"
                slot_tile[slot] = tile
            if bar is not None: bar.arrive()

    def producer():
        def arrive_fill(slot, tile, bar):
            inflight.append((slot, tile, bar))
            if sync_factors: bar.arrive()  # release arrive after the plain-store factor words
        def fill(j):
            slot = j % S
            assert not readers[slot], f"producer writes slot {slot} (tile {j}) while read by {readers[slot]}"
            slot_tile[slot] = None
            arrive_fill(slot, j, full[slot])
        if scale_q:
            inflight.append((None, 'q', None))  # query copies, waited for with cp.async.wait_group
        else:
            arrive_fill(None, 'q', query)
        for j in range(S):
            if j < n_blocks: fill(j)
            yield None
        if scale_q:
            yield lambda: not any(t == 'q' for _, t, _ in inflight)
            query.arrive()  # after the in-place scaling
        for j in range(S, n_blocks):
            slot = j % S
            yield (lambda s=slot, p=((j // S) - 1) & 1: empty[s].done(p))
            fill(j)
            yield None

    def consumer(c):
        def wait_full(j):
            return lambda s=j % S, p=(j // S) & 1: full[s].done(p)
        def use(j):
            s = j % S
            assert slot_tile[s] == j, f"consumer {c} reads slot {s} expecting tile {j}, holds {slot_tile[s]}"
            readers[s].add(c)
        def release(j):
            readers[j % S].discard(c)
            empty[j % S].arrive()
        yield lambda: query.done(0)
        yield wait_full(0)
        use(0)  # S(0) reads K(0)
        for j in range(n_blocks - 1):
            yield wait_full(j + 1)
            use(j + 1)  # S(j + 1), then O += P(j) V(j)
            yield None  # softmax of S(j + 1)
            release(j)  # both products retired: slot j goes back
        yield None  # the last PV product; the last slot is never needed again

    agents = {'P': producer()}
    for c in range(C): agents[f'C{c}'] = consumer(c)
    blocked = {k: None for k in agents}
    while agents:
        land_some()
        runnable = [k for k in agents if blocked[k] is None or blocked[k]()]
        if not runnable:
            if inflight: continue
            raise RuntimeError(f"deadlock: n={n_blocks} S={S} C={C} sync={sync_factors} scale={scale_q}")
        k = rnd.choice(runnable)
        try:
            blocked[k] = next(agents[k])
        except StopIteration:
            del agents[k]; del blocked[k]
    while inflight: land_some()


cases = 0
for n in [1, 2, 3, 4, 5, 7, 12]:
    for S in [2, 3, 4]:
        for C in [1, 2, 3]:
            for sync_factors in [False, True]:
                for scale_q in [False, True]:
                    for seed in range(40):
                        run(n, S, C, sync_factors, scale_q, seed); cases += 1
print("ok", cases)
